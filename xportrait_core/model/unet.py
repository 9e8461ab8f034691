"""The SD1.5 UNet layout, built once from `UNetConfig` for the main UNet and the reference net (and, for its
input half, for the ControlNets in motion_control.py).

Layout (official `openaimodel.py` numbering, which the checkpoint keys use):
  input_blocks[0]        conv_in
  per level              num_res_blocks x (ResBlock [+ SpatialTransformer]), then Downsample except at the last
  middle_block           ResBlock, SpatialTransformer, ResBlock
  output_blocks          per level, reversed: (num_res_blocks + 1) x (ResBlock [+ SpatialTransformer]),
                         the last of each level but the first followed by Upsample
The main UNet adds a motion module after every input ResBlock level block and after every output block.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .blocks import Downsample, ResBlock, SpatialTransformer, TimestepEmbedding, Upsample, normalization
from .config import MotionModuleConfig, UNetConfig
from .operations import Operations, operations_or_default
from .reference_bank import ReferenceBank
from .temporal import MotionModule


class TimestepSequential(nn.Sequential):
    """A UNet block: passes the timestep embedding to ResBlocks and the text context and reference bank to
    spatial transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                bank: Optional[ReferenceBank] = None, conditional_rows: Optional[int] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer.forward_with_bank(x, context, bank, conditional_rows)
            else:
                x = layer(x)
        return x


class _SlotCounter:
    """Hands out reference-bank slots to transformer blocks in build (= execution) order, and carries the
    operations every block of the network is built from."""

    def __init__(self, operations: Operations) -> None:
        self.next = 0
        self.operations = operations

    def transformer(self, cfg: UNetConfig, channels: int) -> SpatialTransformer:
        block = SpatialTransformer(channels, cfg.num_heads, channels // cfg.num_heads, cfg.transformer_depth,
                                   cfg.context_dim, first_bank_slot=self.next, operations=self.operations)
        self.next += cfg.transformer_depth
        return block


def build_input_blocks(cfg: UNetConfig, slots: _SlotCounter):
    """Returns (blocks, channels after each block, indices of the ResBlock-level blocks)."""
    ops = slots.operations
    blocks = nn.ModuleList([TimestepSequential(ops.Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1))])
    channels = [cfg.model_channels]
    res_level = []
    ch, ds = cfg.model_channels, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [ResBlock(ch, cfg.time_embed_dim, mult * cfg.model_channels, ops)]
            ch = mult * cfg.model_channels
            if ds in cfg.attention_resolutions:
                layers.append(slots.transformer(cfg, ch))
            res_level.append(len(blocks))
            blocks.append(TimestepSequential(*layers))
            channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepSequential(Downsample(ch, ops)))
            channels.append(ch)
            ds *= 2
    return blocks, channels, tuple(res_level)


def build_middle_block(cfg: UNetConfig, slots: _SlotCounter) -> TimestepSequential:
    ch = cfg.model_channels * cfg.channel_mult[-1]
    ops = slots.operations
    return TimestepSequential(ResBlock(ch, cfg.time_embed_dim, operations=ops), slots.transformer(cfg, ch),
                              ResBlock(ch, cfg.time_embed_dim, operations=ops))


def build_output_blocks(cfg: UNetConfig, slots: _SlotCounter, input_channels: Sequence[int]) -> nn.ModuleList:
    ops = slots.operations
    blocks = nn.ModuleList()
    skip_channels = list(input_channels)
    ch = cfg.model_channels * cfg.channel_mult[-1]
    ds = 2 ** (len(cfg.channel_mult) - 1)
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            layers = [ResBlock(ch + skip_channels.pop(), cfg.time_embed_dim, cfg.model_channels * mult, ops)]
            ch = cfg.model_channels * mult
            if ds in cfg.attention_resolutions:
                layers.append(slots.transformer(cfg, ch))
            if level and i == cfg.num_res_blocks:
                layers.append(Upsample(ch, ops))
                ds //= 2
            blocks.append(TimestepSequential(*layers))
    return blocks


def _add_to_rows(h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """h + residual, where the residual may cover only the first rows of h (the conditional rows)."""
    rows = residual.shape[0]
    if rows == h.shape[0]:
        return h + residual
    return torch.cat([h[:rows] + residual, h[rows:]])


class UNet(nn.Module):
    """The denoising UNet (with motion modules and an output head) or the reference net (neither)."""

    def __init__(self, cfg: UNetConfig, motion: Optional[MotionModuleConfig] = None, with_out: bool = True,
                 operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        self.config = cfg
        slots = _SlotCounter(ops)
        self.time_embed = TimestepEmbedding(cfg.model_channels, cfg.time_embed_dim, ops)
        self.input_blocks, channels, res_level = build_input_blocks(cfg, slots)
        self.middle_block = build_middle_block(cfg, slots)
        self.output_blocks = build_output_blocks(cfg, slots, channels)
        self.motion_after_input = res_level if motion is not None else ()
        if motion is not None:
            self.input_motion_modules = nn.ModuleList(MotionModule(channels[i], motion, ops) for i in res_level)
            self.output_motion_modules = nn.ModuleList(
                MotionModule(block[0].out_layers[-1].out_channels, motion, ops) for block in self.output_blocks
            )
        if with_out:
            ch = cfg.model_channels
            self.out = nn.Sequential(normalization(ch, ops), nn.SiLU(), ops.Conv2d(ch, cfg.out_channels, 3, padding=1))

    @property
    def has_motion(self) -> bool:
        return bool(self.motion_after_input)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, *,
                bank: Optional[ReferenceBank] = None,
                control: Optional[Sequence[torch.Tensor]] = None,
                num_frames: Optional[int] = None, conditional_rows: Optional[int] = None) -> torch.Tensor:
        """x (N, C, h, w); timesteps (N,); context (N or 1, tokens, C).

        bank: the reference bank to write (reference net) or read (main UNet). control: residuals for every input
        block's output followed by one for the middle block, added to the skip connections and the middle output.
        num_frames: frames per window for the motion modules (default: the whole batch is one window).
        conditional_rows: the bank and the control reach only the first rows of x (a batched guidance pass:
        conditional rows first, unconditional after); default all.
        """
        num_frames = num_frames or x.shape[0]
        if conditional_rows is not None and not 0 < conditional_rows <= x.shape[0]:
            raise ValueError(f"conditional_rows={conditional_rows} for a batch of {x.shape[0]}")
        emb = self.time_embed(timesteps, x.dtype)
        skips = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context, bank, conditional_rows)
            if i in self.motion_after_input:
                h = self.input_motion_modules[self.motion_after_input.index(i)](h, num_frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, bank, conditional_rows)
        if control is not None:
            h = _add_to_rows(h, control[-1])
        for i, block in enumerate(self.output_blocks):
            skip = skips.pop()
            if control is not None:
                skip = _add_to_rows(skip, control[len(skips)])
            h = block(torch.cat([h, skip], dim=1), emb, context, bank, conditional_rows)
            if self.has_motion:
                h = self.output_motion_modules[i](h, num_frames)
        return self.out(h) if hasattr(self, "out") else h
