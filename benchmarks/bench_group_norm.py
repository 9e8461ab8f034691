#!/usr/bin/env python3
"""A candidate kernel, measured before it goes into the model: GroupNorm (optionally followed by SiLU) reading and
writing channels-last activations as they lie, against what the pack runs now without `compile`.

Now (eager, channels-last): PyTorch's CUDA GroupNorm takes contiguous (NCHW) input only, so each channels-last
activation is copied to NCHW, normed, and copied back to channels-last by the convolution that follows; the SiLU
after it is a pass of its own. On the H200 (2026-12-01) one eager channels-last window call spent 39 of its 206 ms
in copies, and one eager VAE decode of 4 frames 29 of its 68 ms in 69 copy kernels beside its 30 GroupNorms.
Compiled (`--compile`), Inductor writes its own channels-last GroupNorm and none of this applies.

Candidate: two Triton passes over the (N, H*W, C) rows. The first sums each channel's values and squares over a
block of rows (float32); a few small PyTorch ops turn those into each group's mean and reciprocal deviation and
each channel's scale and shift; the second reads x once more and writes scale * x + shift (with SiLU if asked),
channels-last. Two reads and one write of the activation, against five reads and four writes now.

    python benchmarks/bench_group_norm.py       # on a CUDA GPU; prints one JSON line per shape and variant

`group_norm_channels_last` runs in Triton's CPU interpreter too (TRITON_INTERPRET=1), where tests check it against
PyTorch's float32 GroupNorm. Not measured on a GPU yet (written 2026-12-01, when no GPU was lent).
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

BLOCK_ROWS, BLOCK_CHANNELS = 64, 64

if triton is not None:

    @triton.jit
    def _channel_sums_kernel(X, SUMS, SQUARES, rows_total, channels, row_blocks,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Program (n, row block, channel block): per-channel sums of x and x*x over BLOCK_R rows of sample n.
        n = tl.program_id(0)
        block = tl.program_id(1)
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < channels
        mask = (rows < rows_total)[:, None] & col_ok[None, :]
        base = n.to(tl.int64) * rows_total * channels
        x = tl.load(X + base + rows.to(tl.int64)[:, None] * channels + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        out = (n * row_blocks + block).to(tl.int64) * channels + cols
        tl.store(SUMS + out, tl.sum(x, axis=0), mask=col_ok)
        tl.store(SQUARES + out, tl.sum(x * x, axis=0), mask=col_ok)

    @triton.jit
    def _scale_shift_kernel(X, Y, SCALE, SHIFT, rows_total, channels,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr):
        # y = x * scale[n, c] + shift[n, c], then SiLU if asked; rounded to Y's dtype once, at the end.
        n = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < channels
        mask = (rows < rows_total)[:, None] & col_ok[None, :]
        offsets = n.to(tl.int64) * rows_total * channels + rows.to(tl.int64)[:, None] * channels + cols[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + n * channels + cols, mask=col_ok, other=0.0)
        shift = tl.load(SHIFT + n * channels + cols, mask=col_ok, other=0.0)
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


def group_norm_channels_last(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float, silu: bool = False, block_rows: int = BLOCK_ROWS,
                             block_channels: int = BLOCK_CHANNELS) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps) (then SiLU if `silu`) for x (N, C, H, W) in channels-last
    memory, returned channels-last. Statistics in float32: the variance as E[x^2] - E[x]^2 over each group."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("group_norm_channels_last takes channels-last input")
    n, channels, height, width = x.shape
    if channels % num_groups:
        raise ValueError(f"{channels} channels do not split into {num_groups} groups")
    rows = height * width
    row_blocks = triton.cdiv(rows, block_rows)
    grid = (n, row_blocks, triton.cdiv(channels, block_channels))
    sums = torch.empty(n, row_blocks, channels, device=x.device, dtype=torch.float32)
    squares = torch.empty_like(sums)
    _channel_sums_kernel[grid](x, sums, squares, rows, channels, row_blocks, BLOCK_R=block_rows,
                               BLOCK_C=block_channels)
    per_group = channels // num_groups
    count = rows * per_group
    mean = sums.sum(1).view(n, num_groups, per_group).sum(-1) / count
    variance = (squares.sum(1).view(n, num_groups, per_group).sum(-1) / count - mean * mean).clamp_min(0.0)
    # Per channel: scale = weight / sqrt(var + eps) of its group, shift = bias - mean * scale.
    scale = torch.rsqrt(variance + eps).repeat_interleave(per_group, dim=1) * weight.float()
    shift = bias.float() - mean.repeat_interleave(per_group, dim=1) * scale
    out = torch.empty_like(x, memory_format=torch.channels_last)
    _scale_shift_kernel[grid](x, out, scale.contiguous(), shift.contiguous(), rows, channels,
                              BLOCK_R=block_rows, BLOCK_C=block_channels, SILU=silu)
    return out


def group_norm_now(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   silu: bool = False) -> torch.Tensor:
    """What the pack runs eagerly now, up to the next convolution's input: GroupNorm, SiLU where a ResBlock or the
    VAE has one, and the copy back to channels-last that a channels-last convolution makes of its input."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if silu:
        y = F.silu(y)
    return y.contiguous(memory_format=torch.channels_last)


# (where, N, C, H*W side, SiLU after it): GroupNorm inputs of a guided 16-frame window at 512x512 (both branches,
# batch 32) and of a VAE decode chunk of 4 frames.
SHAPES = (
    ("unet 64x64, 320", 32, 320, 64, True), ("unet 64x64, 640 (skip concat)", 32, 640, 64, True),
    ("unet 32x32, 960", 32, 960, 32, True), ("unet 16x16, 1280", 32, 1280, 16, True),
    ("unet 8x8, 2560", 32, 2560, 8, True), ("spatial transformer 64x64, 320", 32, 320, 64, False),
    ("vae 128x128, 512", 4, 512, 128, True), ("vae 256x256, 256", 4, 256, 256, True),
    ("vae 512x512, 128", 4, 128, 512, True),
)


def main():
    from triton.testing import do_bench

    dtype = torch.bfloat16
    compiled = torch.compile(group_norm_now, dynamic=False)
    for where, n, channels, side, silu in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(n, channels, side, side, device="cuda", dtype=dtype, generator=g)
        x = (x * 2 + 0.5).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(channels, device="cuda", dtype=dtype, generator=g)
        bias = torch.randn(channels, device="cuda", dtype=dtype, generator=g)
        exact = group_norm_now(x.float(), 32, weight.float(), bias.float(), 1e-6, silu)
        moved = 2 * x.numel() * x.element_size()  # one read and one write: the least any version moves
        variants = {"eager (the pack now)": lambda: group_norm_now(x, 32, weight, bias, 1e-6, silu),
                    "compiled (the pack with --compile)": lambda: compiled(x, 32, weight, bias, 1e-6, silu)}
        for rows, cols in ((64, 64), (32, 64), (128, 64), (16, 128)):
            variants[f"candidate {rows}x{cols}"] = lambda r=rows, c=cols: group_norm_channels_last(
                x, 32, weight, bias, 1e-6, silu, r, c)
        for name, fn in variants.items():
            try:
                out = fn()
                err = float((out.float() - exact).norm() / exact.norm())
                ms = do_bench(fn, warmup=25, rep=200)
            except Exception as exc:
                print(json.dumps({"where": where, "variant": name, "error": str(exc).splitlines()[0][:160]}),
                      flush=True)
                continue
            print(json.dumps({"where": where, "variant": name, "ms": round(ms, 4),
                              "GB/s at one read + one write": round(moved / ms / 1e6), "rel_err": round(err, 5)}),
                  flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available() or triton is None:
        sys.exit("bench_group_norm.py needs a CUDA GPU and Triton")
    main()
