"""LayerNorm over the last dimension: the pack's kernel (`xportrait_core/fast/layer_norm.py`) against PyTorch's, at
the shapes of a guided 16-frame window (the transformer blocks' tokens and the motion modules' frame sequences).

PyTorch's eager LayerNorm (`vectorized_layer_norm_kernel`) is what the kernel replaces on the uncompiled path;
compiled (`--compile`), Inductor writes its own, timed here too. Each record gives the time per call and the rate
at one read and one write of the activation, the least any version moves, and the error against float32.

    python benchmarks/bench_layer_norm.py       # on a CUDA GPU; prints one JSON line per shape and variant

The kernel is kept only if the job-level A/B (bench_comfy.py --ab layer_norm) agrees: see benchmarks/NOTES.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import time_norm_variants  # noqa: E402
from xportrait_core.fast import layer_norm  # noqa: E402

# (where, rows, channels): LayerNorm inputs of a guided 16-frame window at 512x512 (both branches, batch 32):
# transformer tokens at each UNet level, and the motion modules' (pixels x windows, frames) sequences.
SHAPES = (
    ("transformer 64x64, 320", 32 * 4096, 320), ("transformer 32x32, 640", 32 * 1024, 640),
    ("transformer 16x16, 1280", 32 * 256, 1280), ("transformer 8x8, 1280", 32 * 64, 1280),
    ("motion 64x64, 320", 2 * 4096 * 16, 320), ("motion 16x16, 1280", 2 * 256 * 16, 1280),
    ("text encoder, 768", 77, 768),
)


def layer_norm_pytorch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def main():
    dtype = torch.bfloat16
    torch._dynamo.config.recompile_limit = 64  # one compiled graph per shape
    compiled = torch.compile(layer_norm_pytorch, dynamic=False)
    for where, rows, channels in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = (torch.randn(rows, channels, device="cuda", generator=g) * 2 + 0.5).to(dtype)
        weight = torch.randn(channels, device="cuda", generator=g).to(dtype)
        bias = torch.randn(channels, device="cuda", generator=g).to(dtype)
        exact = layer_norm_pytorch(x.float(), weight.float(), bias.float(), 1e-5)
        moved = 2 * x.numel() * x.element_size()
        variants = {"PyTorch (eager)": lambda: layer_norm_pytorch(x, weight, bias, 1e-5),
                    "Inductor (the pack with --compile)": lambda: compiled(x, weight, bias, 1e-5),
                    "kernel (default rows a program)": lambda: layer_norm.layer_norm_rows(x, weight, bias, 1e-5)}
        for block_rows in (1, 2, 4, 8, 16):
            variants[f"kernel {block_rows} rows a program"] = lambda r=block_rows: layer_norm.layer_norm_rows(
                x, weight, bias, 1e-5, r)
        time_norm_variants(where, variants, exact, moved)


if __name__ == "__main__":
    if not torch.cuda.is_available() or layer_norm.triton is None:
        sys.exit("bench_layer_norm.py needs a CUDA GPU and Triton")
    main()
