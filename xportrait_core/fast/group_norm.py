"""GroupNorm over channels-last activations where they lie, as two Triton passes (the uncompiled CUDA path).

PyTorch's CUDA GroupNorm takes contiguous (NCHW) input only: a channels-last activation is copied to NCHW, normed,
and copied back to channels-last by the convolution that follows. Here the (N, H*W, C) rows are read as they lie:
the first pass sums each channel's values and squares over blocks of rows (float32), one reduction turns those
into each group's totals, and the second pass derives each channel's scale and shift from them and writes
scale * x + shift, channels-last. Two reads and one write of the activation, against five reads and four writes.

PyTorch's own kernel wins only where the maps are small and the channels many (the deepest UNet levels);
benchmarks/bench_group_norm.py times both at the model's shapes, and benchmarks/NOTES.md keeps the figures.

`with_kernel(base)` (below; `fast_operations` uses it) runs it for CUDA half-precision channels-last input
outside `torch.compile` (Inductor writes its own, fused GroupNorm there), once a probe has seen it agree with
PyTorch's; ``XPORTRAIT_GROUP_NORM_KERNEL=0`` or `set_group_norm_kernel(False)` turns it off.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .probe import probed_once
from .switches import switched_on
from .triton_launch import launch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs usually lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_ROWS, BLOCK_CHANNELS = 64, 64

_enabled: bool = switched_on("XPORTRAIT_GROUP_NORM_KERNEL")
_works: dict[tuple[str, torch.dtype], bool] = {}


def set_group_norm_kernel(enabled: bool) -> None:
    """Use (default) or bypass the channels-last GroupNorm kernel."""
    global _enabled
    _enabled = bool(enabled)


if triton is not None:

    @triton.jit
    def _channel_sums_kernel(X, SHIFT, PARTIAL, rows_total, channels, row_blocks, plane,
                             HAS_SHIFT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Program (n, row block, channel block): per-channel sums of x and of x*x over BLOCK_R rows of sample n,
        # written to PARTIAL[0, n, block, c] and PARTIAL[1, n, block, c] (`plane` elements apart); with HAS_SHIFT,
        # of x + SHIFT[n, c] instead.
        n = tl.program_id(0)
        block = tl.program_id(1)
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < channels
        mask = (rows < rows_total)[:, None] & col_ok[None, :]
        base = n.to(tl.int64) * rows_total * channels
        x = tl.load(X + base + rows.to(tl.int64)[:, None] * channels + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_SHIFT:
            shift = tl.load(SHIFT + n * channels + cols, mask=col_ok, other=0.0).to(tl.float32)
            x = tl.where(mask, x + shift[None, :], 0.0)  # the rows past the end stay out of the sums
        out = (n * row_blocks + block).to(tl.int64) * channels + cols
        tl.store(PARTIAL + out, tl.sum(x, axis=0), mask=col_ok)
        tl.store(PARTIAL + plane + out, tl.sum(x * x, axis=0), mask=col_ok)

    @triton.jit
    def _normalize_kernel(X, SHIFT, Y, TOTALS, W, B, rows_total, channels, num_groups, per_group, plane, inv_count,
                          eps, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Each channel's group statistics from the group totals (sums of x and x*x, `plane` elements apart), then
        # y = (x - mean) * rstd * weight + bias as one multiply-add (x + SHIFT[n, c] for x with HAS_SHIFT), then
        # y * sigmoid(y) with SILU, rounded once to Y's dtype.
        n = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < channels
        group = n * num_groups + cols // per_group
        mean = tl.load(TOTALS + group, mask=col_ok, other=0.0) * inv_count
        variance = tl.maximum(tl.load(TOTALS + plane + group, mask=col_ok, other=0.0) * inv_count - mean * mean, 0.0)
        scale = tl.rsqrt(variance + eps) * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        shift = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32) - mean * scale
        if HAS_SHIFT:  # (x + s) * scale + shift = x * scale + (s * scale + shift)
            shift += tl.load(SHIFT + n * channels + cols, mask=col_ok, other=0.0).to(tl.float32) * scale
        mask = (rows < rows_total)[:, None] & col_ok[None, :]
        offsets = n.to(tl.int64) * rows_total * channels + rows.to(tl.int64)[:, None] * channels + cols[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


def group_norm_channels_last(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float, block_rows: int = BLOCK_ROWS,
                             block_channels: int = BLOCK_CHANNELS, shift: Optional[torch.Tensor] = None,
                             silu: bool = False) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps) for x (N, C, H, W) in channels-last
    memory, returned channels-last in x's dtype. Statistics in float32, the variance as E[x^2] - E[x]^2 over
    each group (tested on activations off centre). Five launches: the two passes, their buffers and one
    reduction of the per-block sums to group totals (the host's cost matters where no CUDA graph records them).

    shift (N, C), optional: normalises x + shift[:, :, None, None] instead (a ResBlock's timestep embedding, added
    in float32 without a pass of its own); silu: returns silu of the result (the activation after a ResBlock's
    norms), in the same pass."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("group_norm_channels_last takes channels-last input")
    n, channels, height, width = x.shape
    if channels % num_groups:
        raise ValueError(f"{channels} channels do not split into {num_groups} groups")
    if shift is not None:
        if shift.shape != (n, channels):
            raise ValueError(f"a shift of shape ({n}, {channels}) expected, got {tuple(shift.shape)}")
        if shift.device != x.device:
            raise ValueError(f"the shift lies on {shift.device}, the input on {x.device}")
        shift = shift.contiguous()
    rows = height * width
    row_blocks = triton.cdiv(rows, block_rows)
    per_group = channels // num_groups
    grid = (n, row_blocks, triton.cdiv(channels, block_channels))
    partial = torch.empty(2, n, row_blocks, channels, device=x.device, dtype=torch.float32)
    # Without a shift the kernels never read SHIFT: x stands in for the pointer.
    shift_or_x = x if shift is None else shift
    launch(_channel_sums_kernel, grid, x, shift_or_x, partial, rows, channels, row_blocks, n * row_blocks * channels,
           HAS_SHIFT=shift is not None, BLOCK_R=block_rows, BLOCK_C=block_channels)
    totals = partial.view(2, n, row_blocks, num_groups, per_group).sum(dim=(2, 4))  # (2, N, groups)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    launch(_normalize_kernel, grid, x, shift_or_x, out, totals, weight, bias, rows, channels, num_groups, per_group,
           n * num_groups, 1.0 / (rows * per_group), eps, HAS_SHIFT=shift is not None, SILU=bool(silu),
           BLOCK_R=block_rows, BLOCK_C=block_channels)
    return out


def _kernel_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs, and agrees with PyTorch's GroupNorm, for this device type and dtype (probed once):
    Triton can be installed yet unable to build its launcher (no C compiler, say)."""
    def agrees() -> bool:
        # Fixed values, not random ones: a probe must not move anyone's random stream.
        x = torch.arange(2 * 64 * 3 * 5, device=device, dtype=torch.float32).sin().reshape(2, 64, 3, 5) * 2 + 1
        weight, bias = torch.linspace(0.5, 1.5, 64, device=device), torch.linspace(-1, 1, 64, device=device)
        half = x.to(dtype).contiguous(memory_format=torch.channels_last)
        out = group_norm_channels_last(half, 32, weight.to(dtype), bias.to(dtype), 1e-5).float()
        return torch.allclose(out, F.group_norm(half.float(), 32, weight, bias, 1e-5), atol=5e-2, rtol=2e-2)

    return probed_once(_works, "GroupNorm", "PyTorch's GroupNorm", device, dtype, agrees)


def supports(x: torch.Tensor) -> bool:
    """Whether `GroupNorm` runs the kernel on x: CUDA half precision, channels-last (and not also contiguous, as a
    1x1 map is), outside torch.compile, with the kernel on and working."""
    return (
        _enabled
        and not torch.compiler.is_compiling()
        and triton is not None
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
        and _kernel_usable(x.device, x.dtype)
    )


@functools.lru_cache(maxsize=None)
def with_kernel(base: type[nn.Module], defers: Optional[Callable[[nn.Module], bool]] = None) -> type[nn.Module]:
    """A subclass of the GroupNorm class `base` (torch's constructor, `weight`/`bias` parameters: the same
    checkpoint keys) that runs the kernel above on the input it `supports` and `base`'s forward on the rest. The
    kernel reads the parameters as they are, so it also leaves to `base` a layer whose weights lie on another
    device or in another dtype than the input, and any layer for which `defers(layer)` is true (a host's layers
    that cast or patch their weights as they run)."""

    class GroupNormWithKernel(base):
        def _kernel_applies(self, x: torch.Tensor) -> bool:
            return (self.affine and not (defers is not None and defers(self))
                    and self.weight.device == x.device and self.weight.dtype == x.dtype
                    and self.bias.device == x.device and self.bias.dtype == x.dtype and supports(x))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self._kernel_applies(x):
                return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps)
            return super().forward(x)

        def forward_silu(self, x: torch.Tensor, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
            """silu(self(x + shift[:, :, None, None])), shift (N, C) optional: in the kernel's passes where it
            applies (the shift in x's dtype and on its device), as separate operations otherwise."""
            if ((shift is None or (shift.dtype == x.dtype and shift.device == x.device
                                   and shift.shape == x.shape[:2])) and self._kernel_applies(x)):
                return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps, shift=shift,
                                                silu=True)
            if shift is not None:
                x = x + shift[:, :, None, None]
            return F.silu(self(x))

    GroupNormWithKernel.__name__ = GroupNormWithKernel.__qualname__ = f"{base.__name__}WithKernel"
    return GroupNormWithKernel
