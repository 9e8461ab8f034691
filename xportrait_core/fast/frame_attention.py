"""Attention over short sequences (the motion modules' attention along a window's frames), as one Triton kernel.

A motion module attends along frames at every pixel: at 64x64 latents that is 4096 sequences of 16 tokens per
head. Flash-style kernels tile 64 or 128 query rows per (sequence, head), so a 16-token sequence fills a tile a
quarter full or less, and the projections' (tokens, heads x dim) output has to be transposed to their layout and
back. Here one program takes BLOCK_M rows = one or more whole sequences of one head straight from the projections'
layout, computes their scores as one (BLOCK_M x BLOCK_M) product masked to its block diagonal (a token sees only
tokens of its own sequence), and writes the output in the layout the output projection reads: no copies, no
padding beyond the next power of two.

Products outside the diagonal (when a program holds several sequences) are cheap: the work is bound by memory
traffic, which this keeps at one read of q, k, v and one write of the output. The arithmetic is flash attention's
(float32 scores and softmax, half-precision products).

`with_kernel(base)` (below; `fast_operations` uses it) wraps an attention function: CUDA half-precision
self-attention over at most MAX_TOKENS tokens runs here once a probe has seen the kernel agree with SDPA, the rest
(and everything under the math backend, kept for checking) runs `base`. ``XPORTRAIT_FRAME_KERNEL=0`` or
`set_frame_kernel(False)` turns it off.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..model import attention as attention_dispatch
from .probe import probed_once
from .switches import switched_on
from .triton_launch import launch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs usually lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Longest sequence this kernel takes: the motion modules' positional encoding allows up to 24 frames.
MAX_TOKENS = 32
_LOG2E = 1.4426950408889634

log = logging.getLogger("xportrait")

_enabled: bool = switched_on("XPORTRAIT_FRAME_KERNEL")
_works: dict[tuple[str, torch.dtype], bool] = {}


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _frame_attention_kernel(
        Q, K, V, O, num_seqs, seq_len, scale_log2,
        sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
        HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, SEQ_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        block = tl.program_id(0)
        head = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        # Row r of the block is token r % SEQ_PAD of sequence block * (BLOCK_M // SEQ_PAD) + r // SEQ_PAD.
        seq = block * (BLOCK_M // SEQ_PAD) + rows // SEQ_PAD
        tok = rows % SEQ_PAD
        row_ok = (seq < num_seqs) & (tok < seq_len)
        dims = tl.arange(0, DIM_PAD)
        mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
        seq64 = seq.to(tl.int64)[:, None]
        tok64 = tok.to(tl.int64)[:, None]
        q = tl.load(Q + seq64 * sqb + tok64 * sqn + head * sqh + dims[None, :], mask=mask, other=0.0)
        k = tl.load(K + seq64 * skb + tok64 * skn + head * skh + dims[None, :], mask=mask, other=0.0)
        v = tl.load(V + seq64 * svb + tok64 * svn + head * svh + dims[None, :], mask=mask, other=0.0)

        scores = tl.dot(q, tl.trans(k)) * scale_log2
        same_seq = (rows // SEQ_PAD)[:, None] == (rows // SEQ_PAD)[None, :]
        scores = tl.where(same_seq & (tok < seq_len)[None, :], scores, float("-inf"))
        weights = tl.exp2(scores - tl.max(scores, axis=1)[:, None])
        norm = tl.sum(weights, axis=1)
        out = tl.dot(weights.to(v.dtype), v) / norm[:, None]
        tl.store(O + seq64 * sob + tok64 * son + head * soh + dims[None, :], out.to(O.dtype.element_ty), mask=mask)


_sm_counts: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


# Rows per program and warps by padded head dim: the fastest at the motion modules' shapes in
# benchmarks/bench_attention.py --temporal (its figures are in benchmarks/NOTES.md). Small tiles win where the
# diagonal blocks are most of the work; 128-wide heads prefer four sequences a program.
_TILES = {16: (16, 2), 32: (16, 2), 64: (16, 2), 128: (64, 8), 256: (16, 2)}


def launch_config(batch: int, heads: int, tokens: int, dim: int, multiprocessors: int) -> tuple[int, int]:
    """(rows per program, warps): whole sequences per program, as the table above says, fewer while that
    leaves under two programs per multiprocessor, so small inputs still spread over the GPU."""
    seq_pad = max(16, triton.next_power_of_2(tokens))
    dim_pad = max(16, triton.next_power_of_2(dim))
    rows, warps = _TILES[dim_pad]
    block_m = max(seq_pad, rows)
    while block_m > seq_pad and triton.cdiv(batch, block_m // seq_pad) * heads < 2 * multiprocessors:
        block_m //= 2
    return block_m, warps


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int | None = None,
            num_warps: int | None = None) -> torch.Tensor:
    batch, heads, tokens, dim = q.shape
    out = torch.empty(batch, tokens, heads, dim, device=q.device, dtype=q.dtype)
    seq_pad = max(16, triton.next_power_of_2(tokens))
    dim_pad = max(16, triton.next_power_of_2(dim))
    if block_m is None or num_warps is None:
        sms = _multiprocessors(q.device) if q.is_cuda else 132
        block_m, num_warps = launch_config(batch, heads, tokens, dim, sms)
    grid = (triton.cdiv(batch, block_m // seq_pad), heads)
    launch(
        _frame_attention_kernel, grid, q, k, v, out, batch, tokens, _LOG2E / math.sqrt(dim),
        q.stride(0), q.stride(2), q.stride(1), k.stride(0), k.stride(2), k.stride(1),
        v.stride(0), v.stride(2), v.stride(1), out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=dim, DIM_PAD=dim_pad, SEQ_PAD=seq_pad, BLOCK_M=block_m, num_warps=num_warps,
    )
    return out


@torch.library.custom_op("xportrait::frame_attention", mutates_args=())
def _frame_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _launch(q, k, v)


@_frame_attention_op.register_fake
def _(q, k, v):
    batch, heads, tokens, dim = q.shape
    return q.new_empty(batch, tokens, heads, dim)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether `frame_attention` takes these inputs: CUDA half precision, self-attention over at most MAX_TOKENS
    tokens, no mask, head dims unit-stride."""
    return (
        triton is not None
        and not causal
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and k.dtype == v.dtype == q.dtype
        and q.shape == k.shape == v.shape
        and q.shape[2] <= MAX_TOKENS
        and q.shape[3] <= 256
        and q.stride(3) == k.stride(3) == v.stride(3) == 1
    )


def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v (B, H, N, D), N <= MAX_TOKENS; returns (B, H, N, D) as a view of a
    (B, N, H, D) tensor, the layout `Attention`'s output projection reads without a copy."""
    return _frame_attention_op(q, k, v).transpose(1, 2)


def set_frame_kernel(enabled: bool) -> None:
    """Use (default) or bypass the kernel for short CUDA half-precision sequences (the motion modules' attention)."""
    global _enabled
    _enabled = bool(enabled)


def kernel_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs, and agrees with SDPA, for this device type and dtype (probed once). Triton can be
    installed yet unable to build its launcher (no C compiler, say): then those sequences keep to the backend,
    with one warning."""
    if (device.type, dtype) in _works:
        return _works[(device.type, dtype)]
    # Fixed values, not random ones: a probe must not move anyone's random stream.
    q = torch.arange(3 * 2 * 16 * 32, device=device, dtype=torch.float32).sin().reshape(3, 2, 16, 32).to(dtype)
    if not supports(q, q, q, causal=False):
        _works[(device.type, dtype)] = False
        return False

    def agrees() -> bool:
        out = frame_attention(q, q, q).float()
        expected = F.scaled_dot_product_attention(q.float(), q.float(), q.float())
        return torch.allclose(out, expected, atol=2e-2, rtol=2e-2)

    works = probed_once(_works, "frame-attention", "SDPA", device, dtype, agrees)
    if works:
        log.info("X-Portrait frame-attention kernel in use for the motion modules (%s, %s)", device.type,
                 str(dtype).replace("torch.", ""))
    return works


@functools.lru_cache(maxsize=None)
def with_kernel(base: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An attention function (q, k, v, *, causal=False) that runs the kernel on the inputs it `supports` and
    `base` on the rest."""

    def attention_with_frame_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                    causal: bool = False) -> torch.Tensor:
        if (_enabled and supports(q, k, v, causal) and attention_dispatch.get_attention_backend_setting() != "math"
                and kernel_usable(q.device, q.dtype)):
            return frame_attention(q, k, v)
        return base(q, k, v, causal=causal)

    return attention_with_frame_kernel
