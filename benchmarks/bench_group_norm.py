"""GroupNorm (optionally followed by SiLU) on channels-last activations: the pack's kernel
(`xportrait_core/fast/group_norm.py`) against PyTorch's, at the shapes of a guided window step and a VAE decode chunk.

PyTorch's CUDA GroupNorm takes contiguous (NCHW) input only, so each channels-last activation is copied to NCHW,
normed, and copied back to channels-last by the convolution that follows; the SiLU after it is a pass of its own.
On the H200 (2026-12-01) one eager channels-last window call spent 39 of its 206 ms in copies, and one eager VAE
decode of 4 frames 29 of its 68 ms in 69 copy kernels beside its 30 GroupNorms. Compiled (`--compile`), Inductor
writes its own channels-last GroupNorm, timed here too.

    python benchmarks/bench_group_norm.py       # on a CUDA GPU; prints one JSON line per shape and variant

Measured on the H200 (bf16, 2026-12-01, beside other processes' compiles; the module docstring of group_norm.py
quotes the figures): the kernel took a third to a seventh of PyTorch's time at most shapes, and lost at
32 x 1280 x 16 x 16.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import time_norm_variants  # noqa: E402
from xportrait_core.fast import group_norm  # noqa: E402


def group_norm_pytorch(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       silu: bool = False) -> torch.Tensor:
    """PyTorch's path, up to the next convolution's input: GroupNorm, SiLU where a ResBlock or the VAE has one, and
    the copy back to channels-last that a channels-last convolution makes of its input."""
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
    dtype = torch.bfloat16
    torch._dynamo.config.recompile_limit = 64  # one compiled graph per shape
    compiled = torch.compile(group_norm_pytorch, dynamic=False)
    for where, n, channels, side, silu in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(n, channels, side, side, device="cuda", dtype=dtype, generator=g)
        x = (x * 2 + 0.5).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(channels, device="cuda", dtype=dtype, generator=g)
        bias = torch.randn(channels, device="cuda", dtype=dtype, generator=g)
        exact = group_norm_pytorch(x.float(), 32, weight.float(), bias.float(), 1e-6, silu)
        moved = 2 * x.numel() * x.element_size()  # one read and one write: the least any version moves
        variants = {"PyTorch (eager)": lambda: group_norm_pytorch(x, 32, weight, bias, 1e-6, silu),
                    "Inductor (the pack with --compile)": lambda: compiled(x, 32, weight, bias, 1e-6, silu)}
        for rows, cols in ((64, 64), (32, 64), (128, 64), (16, 128)):
            # SiLU in the kernel's writing pass, as the pack's ResBlocks ask for it (blocks.norm_silu).
            variants[f"kernel {rows}x{cols}"] = lambda r=rows, c=cols: group_norm.group_norm_channels_last(
                x, 32, weight, bias, 1e-6, r, c, silu=silu)
        time_norm_variants(where, variants, exact, moved)


if __name__ == "__main__":
    if not torch.cuda.is_available() or group_norm.triton is None:
        sys.exit("bench_group_norm.py needs a CUDA GPU and Triton")
    main()
