"""value * gelu(gate) over a GEGLU projection's output in one pass (the uncompiled CUDA path).

GEGLU projects each token to [value | gate] (2 x inner wide) and keeps value * gelu(gate). Eagerly that is two
PyTorch kernels over halves of the projection, each a strided view (every row skips the other half), so both run
PyTorch's generic, unvectorised elementwise path: gelu reads the gate and writes it back, the multiply reads both
and writes the product. Here one Triton pass reads both halves once and writes the product once, computed in
float32 with one rounding (PyTorch's pair rounds gelu's output first). benchmarks/bench_geglu.py times it;
benchmarks/NOTES.md keeps the figures.

`with_kernel(base)` (below; `fast_operations` uses it) runs it for CUDA half-precision input outside autograd
and outside `torch.compile` (Inductor fuses the pair itself there), once a probe has seen it agree with PyTorch's;
``XPORTRAIT_GEGLU_KERNEL=0`` or `set_geglu_kernel(False)` turns it off.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from ..model.operations import gated_gelu as pytorch_gated_gelu
from .probe import probed_once
from .switches import switched_on
from .triton_launch import launch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs usually lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_ROWS, BLOCK_COLUMNS = 8, 256

_enabled: bool = switched_on("XPORTRAIT_GEGLU_KERNEL")
_works: dict[tuple[str, torch.dtype], bool] = {}


def set_geglu_kernel(enabled: bool) -> None:
    """Use (default) or bypass the GEGLU activation kernel."""
    global _enabled
    _enabled = bool(enabled)


if triton is not None:

    @triton.jit
    def _gated_gelu_kernel(P, OUT, rows_total, inner, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Program (row block, column block) of OUT (rows, inner) = P[:, :inner] * gelu(P[:, inner:]), P (rows, 2*inner).
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < rows_total)[:, None] & (cols < inner)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        value_at = P + rows64 * (2 * inner) + cols[None, :]
        value = tl.load(value_at, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(value_at + inner, mask=mask, other=0.0).to(tl.float32)
        out = value * (0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)))  # the exact (erf) gelu, as F.gelu
        tl.store(OUT + rows64 * inner + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


def gated_gelu(projection: torch.Tensor, block_rows: int = BLOCK_ROWS,
               block_columns: int = BLOCK_COLUMNS) -> torch.Tensor:
    """value * gelu(gate) for a contiguous projection (..., 2 * inner) = [value | gate]; returns (..., inner) in its
    dtype."""
    if not projection.is_contiguous():
        raise ValueError("gated_gelu takes a contiguous projection")
    width = projection.shape[-1]
    if width % 2:
        raise ValueError(f"a GEGLU projection has an even width, got {width}")
    inner = width // 2
    rows = projection.numel() // width
    out = projection.new_empty(projection.shape[:-1] + (inner,))
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(inner, block_columns))
    launch(_gated_gelu_kernel, grid, projection, out, rows, inner, BLOCK_R=block_rows, BLOCK_C=block_columns)
    return out


def _kernel_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs, and agrees with PyTorch, for this device type and dtype (probed once): Triton can be
    installed yet unable to build its launcher (no C compiler, say)."""
    def agrees() -> bool:
        # Fixed values, not random ones: a probe must not move anyone's random stream.
        probe = (torch.arange(3 * 5 * 2 * 40, device=device, dtype=torch.float32).sin() * 3).reshape(3, 5, 80)
        half = probe.to(dtype)
        return torch.allclose(gated_gelu(half).float(), pytorch_gated_gelu(half.float()), atol=3e-2, rtol=2e-2)

    return probed_once(_works, "GEGLU", "PyTorch's gelu and multiply", device, dtype, agrees)


def supports(projection: torch.Tensor) -> bool:
    """Whether `with_kernel`'s function runs the kernel on this projection output: CUDA half precision, contiguous, no autograd,
    outside torch.compile, with the kernel on and working."""
    return (
        _enabled
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and triton is not None
        and projection.is_cuda
        and projection.dtype in (torch.float16, torch.bfloat16)
        and projection.is_contiguous()
        and _kernel_usable(projection.device, projection.dtype)
    )


@functools.lru_cache(maxsize=None)
def with_kernel(base: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gated-gelu function that runs the kernel on the projections it `supports` and `base` on the rest."""

    def gated_gelu_with_kernel(projection: torch.Tensor) -> torch.Tensor:
        if supports(projection):
            return gated_gelu(projection)
        return base(projection)

    return gated_gelu_with_kernel
