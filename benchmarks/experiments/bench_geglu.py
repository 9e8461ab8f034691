#!/usr/bin/env python3
"""A candidate kernel, measured before it goes into the model: the GEGLU feed-forward's projection fused with its
activation, against what the pack runs now, at the shapes of a guided window step (512x512, both branches of a
16-frame window in one batch of 32).

Now: one matrix product writes the projection (tokens x 2*inner: the value half and the gate half), then an
Inductor kernel reads both halves and writes value * gelu(gate) (tokens x inner). At 64x64 latents that is 671 MB
written and read again per feed-forward, and the gelu-mul kernels took 6 ms of a 134 ms window call (H200,
2026-12-01). Fused: each program computes one tile of the value half and the same tile of the gate half from
the same input rows, and writes only value * gelu(gate). Worth it if its matrix work keeps up with cuBLAS:

    python benchmarks/experiments/bench_geglu.py            # on a CUDA GPU; prints one JSON line per case and variant

`fused_geglu` runs in Triton's CPU interpreter too (TRITON_INTERPRET=1), where tests check it against PyTorch.

Measured on the H200 (2026-12-01): not worth it. The best tile shape took 0.680 ms against 0.673 for the compiled
pair at 64x64, and lost at 32x32 (0.525 vs 0.484) and 16x16 (0.457 vs 0.397): the model keeps the compiled pair.
Kept to measure again on other GPUs or Triton versions.
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

if triton is not None:

    @triton.jit
    def _geglu_kernel(X, W, B, O, M, N, K, sxm, swn, som,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # Programs walk GROUP_M row tiles down one column of tiles before moving right, so neighbouring programs
        # share input rows (and weight columns) in L2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rm64 = rm.to(tl.int64)
        acc_value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(X + rm64[:, None] * sxm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            w_mask = (kk[:, None] < K) & (rn[None, :] < N)
            # Weight rows n (value) and N + n (gate) of nn.Linear's (2N, K) matrix, as (K, N) tiles.
            w_value = tl.load(W + rn[None, :] * swn + kk[:, None], mask=w_mask, other=0.0)
            w_gate = tl.load(W + (rn[None, :] + N) * swn + kk[:, None], mask=w_mask, other=0.0)
            acc_value = tl.dot(a, w_value, acc_value)
            acc_gate = tl.dot(a, w_gate, acc_gate)
        n_ok = rn < N
        value = acc_value + tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        gate = acc_gate + tl.load(B + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = value * (0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)))  # exact (erf) gelu, as F.gelu
        tl.store(O + rm64[:, None] * som + rn[None, :], out.to(O.dtype.element_ty),
                 mask=(rm[:, None] < M) & n_ok[None, :])


CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3), (256, 64, 64, 8, 3),
]


def fused_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, config=CONFIGS[0]) -> torch.Tensor:
    """value * gelu(gate) where [value | gate] = x @ weight.T + bias, as GEGLU computes it; x (..., K) with its
    last dimension contiguous, weight (2N, K), bias (2N,). Products accumulate in float32 and the activation is
    applied before rounding to x's dtype."""
    block_m, block_n, block_k, warps, stages = config
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    weight = weight.contiguous()
    M, K = rows.shape
    N = weight.shape[0] // 2
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _geglu_kernel[grid](rows, weight, bias, out, M, N, K, rows.stride(0), weight.stride(0), out.stride(0),
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps,
                        num_stages=stages)
    return out.view(*x.shape[:-1], N)


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What the pack's GEGLU computes (blocks.GEGLU): one projection, then value * gelu(gate)."""
    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return value * F.gelu(gate)


def main():
    from triton.testing import do_bench

    dtype = torch.bfloat16
    compiled = torch.compile(geglu_reference, dynamic=False)
    # (level, tokens of both branches of a 16-frame window, channels): 64x64, 32x32 and 16x16 latents; inner = 4x.
    for level, tokens, channels in (("64x64", 32 * 4096, 320), ("32x32", 32 * 1024, 640), ("16x16", 32 * 256, 1280)):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(tokens, channels, device="cuda", dtype=dtype, generator=g)
        weight = torch.randn(8 * channels, channels, device="cuda", dtype=dtype, generator=g) / channels ** 0.5
        bias = torch.randn(8 * channels, device="cuda", dtype=dtype, generator=g)
        exact = geglu_reference(x.float(), weight.float(), bias.float())
        flops = 2 * tokens * channels * 8 * channels
        variants = {"eager": lambda: geglu_reference(x, weight, bias),
                    "compiled (the pack now)": lambda: compiled(x, weight, bias)}
        for config in CONFIGS:
            variants[f"fused {config}"] = lambda c=config: fused_geglu(x, weight, bias, c)
        for name, fn in variants.items():
            try:
                out = fn()
                err = float((out.float() - exact).norm() / exact.norm())
                ms = do_bench(fn, warmup=25, rep=200)
            except Exception as exc:  # a config that does not fit the chip's shared memory, say
                print(json.dumps({"level": level, "variant": name, "error": str(exc).splitlines()[0][:160]}),
                      flush=True)
                continue
            print(json.dumps({"level": level, "variant": name, "ms": round(ms, 4),
                              "tflops": round(flops / ms / 1e9, 1), "rel_err": round(err, 5)}), flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available() or triton is None:
        sys.exit("bench_geglu.py needs a CUDA GPU and Triton")
    main()
