#!/usr/bin/env python3
"""Attention kernels at the shapes X-Portrait runs them (512x512, 16-frame windows), on a CUDA GPU.

Each case starts from the projections' output layout (tokens, heads x dim), as `Attention` hands it over, and
ends with the (tokens, heads x dim) tensor its output projection reads, so layout copies are counted.

    python benchmarks/bench_attention.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xportrait_core.fast import frame_attention  # noqa: E402

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION}


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def heads(t: torch.Tensor, h: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, h, c // h).transpose(1, 2)


def merge(out: torch.Tensor) -> torch.Tensor:
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def run_case(name: str, batch: int, tokens: int, key_tokens: int, channels: int, num_heads: int, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, tokens, channels, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(batch, key_tokens, channels, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(batch, key_tokens, channels, device="cuda", dtype=dtype, generator=g)
    ref = merge(F.scaled_dot_product_attention(heads(q, num_heads).float(), heads(k, num_heads).float(),
                                               heads(v, num_heads).float()))
    flops = 4 * batch * tokens * key_tokens * channels
    moved = (q.numel() * 2 + k.numel() + v.numel()) * q.element_size()
    variants = {}
    for backend, which in SDPA_BACKENDS.items():
        def fn(which=which):
            with sdpa_kernel([which]):
                return merge(F.scaled_dot_product_attention(heads(q, num_heads), heads(k, num_heads), heads(v, num_heads)))
        variants[f"sdpa-{backend}"] = fn
    variants["sdpa-auto"] = lambda: merge(F.scaled_dot_product_attention(heads(q, num_heads), heads(k, num_heads),
                                                                       heads(v, num_heads)))
    if tokens == key_tokens and tokens <= frame_attention.MAX_TOKENS and frame_attention.available():
        variants["frame-kernel"] = lambda: merge(frame_attention.frame_attention(heads(q, num_heads), heads(k, num_heads),
                                                                                heads(v, num_heads)))
        for block_m in (16, 32, 64, 128):
            for warps in (2, 4, 8):
                variants[f"frame-kernel-{block_m}x{warps}"] = lambda b=block_m, w=warps: merge(frame_attention._launch(
                    heads(q, num_heads), heads(k, num_heads), heads(v, num_heads), b, w).transpose(1, 2))
    for variant, fn in variants.items():
        try:
            out = fn()
            err = float((out.float() - ref).abs().max())
            ms = bench_ms(fn)
        except RuntimeError as exc:
            print(json.dumps({"case": name, "variant": variant, "error": str(exc).splitlines()[0][:160]}), flush=True)
            continue
        print(json.dumps({"case": name, "variant": variant, "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1),
                          "gb_per_s": round(moved / ms / 1e6, 1), "max_abs_err": round(err, 5)}), flush=True)


def main():
    temporal_only = "--temporal" in sys.argv
    dtype = torch.bfloat16
    frames = 16
    # Temporal attention: one sequence of `frames` tokens per pixel (64x64, 32x32, 16x16, 8x8 latents).
    for channels, pixels in ((320, 4096), (640, 1024), (1280, 256), (1280, 64)):
        run_case(f"temporal C={channels} pixels={pixels}", pixels, frames, frames, channels, 8, dtype)
    if temporal_only:
        return
    # Spatial self-attention over the frame's own tokens plus the reference bank's (main UNet), then without.
    for channels, pixels in ((320, 4096), (640, 1024), (1280, 256)):
        run_case(f"spatial+bank C={channels} N={pixels}", frames, pixels, 2 * pixels, channels, 8, dtype)
        run_case(f"spatial C={channels} N={pixels}", frames, pixels, pixels, channels, 8, dtype)
        run_case(f"cross C={channels} N={pixels}", frames, pixels, 77, channels, 8, dtype)


if __name__ == "__main__":
    main()
