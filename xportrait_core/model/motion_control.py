"""Hierarchical motion control: a global ControlNet fed the whole aligned driving frame and a local ControlNet fed
only its eye and mouth patches. Each produces one residual per UNet skip connection plus one for the middle block;
the two are scaled by their strengths and added to the main UNet's skips (official weight: 1.0 each).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .blocks import TimestepEmbedding
from .config import ControlNetConfig, UNetConfig
from .operations import Operations, operations_or_default
from .unet import _SlotCounter, build_input_blocks, build_middle_block


def _zero_conv(channels: int, operations: Operations) -> nn.Sequential:
    # A 1x1 conv initialised to zero in training, so control starts as a no-op. Wrapped in a Sequential to keep the
    # official key layout (`zero_convs.N.0.weight`).
    return nn.Sequential(operations.Conv2d(channels, channels, 1))


def _hint_encoder(control: ControlNetConfig, out_channels: int, operations: Operations) -> nn.Sequential:
    """Image-space hint (3, H, W) -> features at latent resolution (H/8): convs with SiLU, three of them stride 2."""
    widths = (control.hint_channels,) + tuple(control.hint_block_channels)
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        # Stages: 16,16 | 32,32 | 96,96 | 256 ; the first conv of each new width after the first halves the size.
        stride = 2 if i in (2, 4, 6) else 1
        layers += [operations.Conv2d(c_in, c_out, 3, padding=1, stride=stride), nn.SiLU()]
    layers.append(operations.Conv2d(widths[-1], out_channels, 3, padding=1))
    return nn.Sequential(*layers)


class ControlNet(nn.Module):
    """The UNet's input half and middle, with the hint added after the first conv and a zero conv per output."""

    def __init__(self, cfg: UNetConfig, control: ControlNetConfig, operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        slots = _SlotCounter(ops)
        self.time_embed = TimestepEmbedding(cfg.model_channels, cfg.time_embed_dim, ops)
        self.input_blocks, channels, _ = build_input_blocks(cfg, slots)
        self.input_hint_block = _hint_encoder(control, cfg.model_channels, ops)
        self.zero_convs = nn.ModuleList(_zero_conv(ch, ops) for ch in channels)
        self.middle_block = build_middle_block(cfg, slots)
        self.middle_block_out = _zero_conv(channels[-1], ops)

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """Hint images (N, 3, H, W) in [-1, 1], in the dtype the network computes in -> hint features
        (N, model_channels, H/8, W/8). They depend on the hint alone, so a caller may compute them once per video
        and pass them with `hint_encoded=True`."""
        return self.input_hint_block(hint)

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                hint_encoded: bool = False) -> list[torch.Tensor]:
        emb = self.time_embed(timesteps, x.dtype)
        guided_hint = hint.to(x.dtype) if hint_encoded else self.encode_hint(hint.to(x.dtype))
        residuals = []
        h = x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint
            residuals.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        residuals.append(self.middle_block_out(h))
        return residuals


def combine_motion_residuals(global_residuals: Optional[list[torch.Tensor]], global_strength: float,
                             local_residuals: Optional[list[torch.Tensor]], local_strength: float) -> Optional[list[torch.Tensor]]:
    """Sum of strength-scaled residuals of whichever ControlNets ran (None when neither did).

    Without autograd the local residuals are added into the global ones in place: both lists are fresh ControlNet
    outputs, and a third full set of skip-sized tensors would only raise the memory peak."""
    combined = None
    for residuals, strength in ((global_residuals, global_strength), (local_residuals, local_strength)):
        if residuals is None:
            continue
        if combined is None:
            combined = residuals if strength == 1.0 else [r * strength for r in residuals]
        elif torch.is_grad_enabled():
            combined = [a + b * strength for a, b in zip(combined, residuals)]
        else:
            for a, b in zip(combined, residuals):
                a.add_(b, alpha=strength)
    return combined
