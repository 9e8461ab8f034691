"""Temporal motion modules (AnimateDiff "Vanilla"), placed after UNet blocks for consistency across frames.

Each module attends along the frame axis only: every spatial position of a window's frames is a sequence of
`num_frames` tokens. Frames of different windows never see each other; batches are laid out frame-major per
window, (windows * frames, C, H, W), as the official `(b f) c h w` convention.

The official code rearranges pixels-as-batch before and after each of its two attentions. Everything between
the module's input norm and its output projection acts on single tokens (linear layers, layer norms, the
feed-forward) or along frames (attention), so here the rearrangement happens once on the way in and once on the
way out: the same function with half the memory traffic.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .blocks import Attention, FeedForward, norm_plus
from .config import MotionModuleConfig
from .operations import Operations, operations_or_default


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal encoding of the frame index, added to the tokens before each temporal attention.

    The table is a buffer because the official checkpoint stores it (`pos_encoder.pe`); loading it keeps the
    checkpoint's exact values.
    """

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * div_term)
        pe[0, :, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def table(self, like: torch.Tensor) -> torch.Tensor:
        """The encoding of frames 0..F-1 for sequences `like` (..., F, C): (F, C) in like's dtype, on its device.

        A host that loads the networks partially (ComfyUI's --lowvram) moves only layers with weights, so this
        buffer can still lie in system memory while the activations are on the GPU."""
        return self.pe[0, : like.shape[-2]].to(like.device, like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table(x)


class TemporalSelfAttention(Attention):
    def __init__(self, dim: int, heads: int, max_frames: int, operations: Optional[Operations] = None):
        super().__init__(dim, heads, dim // heads, operations=operations)
        self.pos_encoder = PositionalEncoding(dim, max_frames)

    def forward(self, sequences: torch.Tensor, encoded: bool = False) -> torch.Tensor:
        """sequences (windows * pixels, frames, C): attention along frames, with the frame-index encoding added
        here, or already by the caller (`encoded`: the block adds it as it normalises)."""
        return super().forward(sequences if encoded else self.pos_encoder(sequences))


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, attentions: int, max_frames: int, operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        self.attention_blocks = nn.ModuleList(TemporalSelfAttention(dim, heads, max_frames, ops)
                                              for _ in range(attentions))
        self.norms = nn.ModuleList(ops.LayerNorm(dim) for _ in range(attentions))
        self.ff = FeedForward(dim, operations=ops)
        self.ff_norm = ops.LayerNorm(dim)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            encoded = norm_plus(norm, sequences, attn.pos_encoder.table(sequences))
            sequences = attn(encoded, encoded=True) + sequences
        return self.ff(self.ff_norm(sequences)) + sequences


class MotionModule(nn.Module):
    """GroupNorm, linear in, temporal transformer blocks, linear out, residual (zero-initialised out in training)."""

    def __init__(self, channels: int, config: MotionModuleConfig, operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        self.max_frames = config.max_frames
        self.norm = ops.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = ops.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(channels, config.num_heads, config.attentions_per_block, config.max_frames, ops)
            for _ in range(config.num_blocks)
        )
        self.proj_out = ops.Linear(channels, channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        frames_total, channels, height, width = x.shape
        if frames_total % num_frames:
            raise ValueError(f"batch of {frames_total} frames is not a whole number of {num_frames}-frame windows")
        if num_frames > self.max_frames:
            raise ValueError(f"windows of {num_frames} frames exceed the motion module's {self.max_frames}-frame encoding")
        windows = frames_total // num_frames
        # (windows*frames, C, H, W) -> (windows*H*W, frames, C): one sequence of frames per pixel and window.
        h = self.norm(x).view(windows, num_frames, channels, height * width).permute(0, 3, 1, 2)
        h = self.proj_in(h.reshape(windows * height * width, num_frames, channels))
        for block in self.transformer_blocks:
            h = block(h)
        h = self.proj_out(h)
        if x.is_contiguous(memory_format=torch.channels_last):
            # Back to (frames, H, W, C) in memory: the channels-last layout the rest of the network runs in.
            h = h.view(windows, height * width, num_frames, channels).transpose(1, 2)
            h = h.reshape(frames_total, height, width, channels).permute(0, 3, 1, 2)
        else:
            h = h.view(windows, height * width, num_frames, channels).permute(0, 2, 3, 1)
            h = h.reshape(frames_total, channels, height, width)
        return h + x
