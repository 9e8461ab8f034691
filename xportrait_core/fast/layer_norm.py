"""LayerNorm over the last dimension in one read and one write of the activation (the uncompiled CUDA path).

Every LayerNorm of the networks (the transformer blocks' norm1/2/3, the motion modules' norms, the text encoder's)
normalises the channels (320 to 1280 in the UNet) of (batch, tokens, channels) activations. Here each program
takes a block of rows, loads each row whole (the channel count padded to the next power of two, masked), computes
its mean and variance in float32 from those registers (the variance around the mean, not E[x^2] - E[x]^2), and
writes (x - mean) * rstd * weight + bias, rounded once to the input's dtype. PyTorch's `vectorized_layer_norm_kernel`
is what it replaces in the eager profile; benchmarks/bench_layer_norm.py times both at the model's shapes, and
benchmarks/NOTES.md keeps the figures.

`with_kernel(base)` (below; `fast_operations` uses it) runs it for CUDA half-precision input outside autograd and
outside `torch.compile` (Inductor writes its own, fused LayerNorm there), once a probe has seen it agree with
PyTorch's; ``XPORTRAIT_LAYER_NORM_KERNEL=0`` or `set_layer_norm_kernel(False)` turns it off.
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

# A row is held whole in registers: past this many (padded) channels the tile would spill, and PyTorch's kernel,
# which loops over a row, is left the call. The networks' widest LayerNorm is 1280 channels.
MAX_BLOCK_CHANNELS = 8192
# Elements of one program's (rows x padded channels) tile: narrow rows are taken several to a program, so that a
# program's loads are as wide at 320 channels as at 1280.
TILE_ELEMENTS = 4096

_enabled: bool = switched_on("XPORTRAIT_LAYER_NORM_KERNEL")
_works: dict[tuple[str, torch.dtype], bool] = {}


def set_layer_norm_kernel(enabled: bool) -> None:
    """Use (default) or bypass the LayerNorm kernel."""
    global _enabled
    _enabled = bool(enabled)


if triton is not None:

    @triton.jit
    def _layer_norm_kernel(X, Y, W, B, ADDEND, rows_total, channels, x_row_stride, period, inv_channels, eps,
                           HAS_ADDEND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Program r: rows [r * BLOCK_R, (r + 1) * BLOCK_R) of X (rows `x_row_stride` elements apart, channels
        # adjacent) into the contiguous Y (rows `channels` apart); with HAS_ADDEND, row i of the contiguous
        # (period, channels) ADDEND is added to every row r of Y with r % period == i, before the one rounding.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < channels
        mask = (rows < rows_total)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) * inv_channels
        # Deviations from the mean, zero in the padding, so that the variance sums the real channels only.
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) * inv_channels + eps)
        weight = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        bias = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = centred * rstd[:, None] * weight[None, :] + bias[None, :]
        if HAS_ADDEND:
            addend_rows = (rows % period).to(tl.int64)[:, None]
            y += tl.load(ADDEND + addend_rows * channels + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + rows64 * channels + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def rows_of(x: torch.Tensor) -> Optional[torch.Tensor]:
    """x as a 2-D (rows, channels) view without a copy (the channels adjacent, the rows at one constant stride),
    or None where its layout has no such view (a transposed or otherwise permuted activation)."""
    if x.dim() == 0 or x.numel() == 0 or x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:  # leading dimensions that do not merge into one stride
        return None


def block_channels(channels: int) -> int:
    """The padded row width a program holds: the next power of two."""
    return 1 << max(channels - 1, 0).bit_length()


def layer_norm_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    block_rows: Optional[int] = None, addend: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.layer_norm(x, (C,), weight, bias, eps) over x's last dimension C, for x whose rows `rows_of` can view;
    returned contiguous in x's dtype. Mean and variance in float32 from one read of each row.

    addend (P, C), optional: added to the normalised rows as it broadcasts over x (..., P, C), i.e. row i of the
    addend to every row of x whose index along x's second-to-last dimension is i, in the same pass (float32, one
    rounding): the motion modules' frame encoding, added to each normalised token before its temporal attention."""
    rows = rows_of(x)
    if rows is None:
        raise ValueError("layer_norm_rows takes input whose rows lie at one stride, channels adjacent")
    channels = x.shape[-1]
    if weight.shape != (channels,) or bias.shape != (channels,):
        raise ValueError(f"weight and bias of {channels} channels expected, got {tuple(weight.shape)} and "
                         f"{tuple(bias.shape)}")
    if addend is not None:
        if x.dim() < 2 or addend.shape != (x.shape[-2], channels):
            raise ValueError(f"an addend of shape ({x.shape[-2] if x.dim() > 1 else '?'}, {channels}) expected "
                             f"for input {tuple(x.shape)}, got {tuple(addend.shape)}")
        if addend.device != x.device:
            raise ValueError(f"the addend lies on {addend.device}, the input on {x.device}")
    width = block_channels(channels)
    if width > MAX_BLOCK_CHANNELS:
        raise ValueError(f"{channels} channels do not fit one program's row ({MAX_BLOCK_CHANNELS} at most)")
    if block_rows is None:
        block_rows = max(1, TILE_ELEMENTS // width)
    elif block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two (Triton's tiles are), got {block_rows}")
    # The kernel reads weight and bias at unit stride; a parameter usually is contiguous, and then this is no copy.
    weight, bias = weight.contiguous(), bias.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    count = rows.shape[0]
    grid = (triton.cdiv(count, block_rows),)
    # Without an addend the kernel never reads ADDEND: any tensor of the device stands in for the pointer.
    addend_rows = out if addend is None else addend.contiguous()
    period = 1 if addend is None else addend.shape[0]
    launch(_layer_norm_kernel, grid, rows, out, weight, bias, addend_rows, count, channels, rows.stride(0), period,
           1.0 / channels, eps, HAS_ADDEND=addend is not None, BLOCK_R=block_rows, BLOCK_C=width,
           num_warps=8 if width >= 2048 else 4)
    return out


def _kernel_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs, and agrees with PyTorch's LayerNorm, for this device type and dtype (probed once):
    Triton can be installed yet unable to build its launcher (no C compiler, say)."""
    def agrees() -> bool:
        # Fixed values, not random ones: a probe must not move anyone's random stream. 40 channels: a padded row.
        x = torch.arange(3 * 5 * 40, device=device, dtype=torch.float32).sin().reshape(3, 5, 40) * 2 + 1
        weight, bias = torch.linspace(0.5, 1.5, 40, device=device), torch.linspace(-1, 1, 40, device=device)
        half = x.to(dtype)
        out = layer_norm_rows(half, weight.to(dtype), bias.to(dtype), 1e-5).float()
        return torch.allclose(out, F.layer_norm(half.float(), (40,), weight.to(dtype).float(),
                                                bias.to(dtype).float(), 1e-5), atol=5e-2, rtol=2e-2)

    return probed_once(_works, "LayerNorm", "PyTorch's LayerNorm", device, dtype, agrees)


def supports(x: torch.Tensor) -> bool:
    """Whether `LayerNorm` runs the kernel on x: CUDA half precision, rows at one stride with the channels adjacent,
    a row that fits one program, no autograd, outside torch.compile, with the kernel on and working."""
    return (
        _enabled
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and triton is not None
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and rows_of(x) is not None
        and block_channels(x.shape[-1]) <= MAX_BLOCK_CHANNELS
        and _kernel_usable(x.device, x.dtype)
    )


@functools.lru_cache(maxsize=None)
def with_kernel(base: type[nn.Module], defers: Optional[Callable[[nn.Module], bool]] = None) -> type[nn.Module]:
    """A subclass of the LayerNorm class `base` (torch's constructor, `weight`/`bias` parameters: the same
    checkpoint keys) that runs the kernel above on the input it `supports` and `base`'s forward on the rest. The
    kernel reads the parameters as they are, so it also leaves to `base` a layer without both a weight and a bias,
    one normalising more than the last dimension, one whose weights lie on another device or in another dtype than
    the input, and any layer for which `defers(layer)` is true (a host's layers that cast or patch their weights as
    they run)."""

    class LayerNormWithKernel(base):
        def _kernel_applies(self, x: torch.Tensor) -> bool:
            weight, bias = self.weight, self.bias
            return (weight is not None and bias is not None and len(self.normalized_shape) == 1
                    and not (defers is not None and defers(self))
                    and weight.device == x.device and weight.dtype == x.dtype
                    and bias.device == x.device and bias.dtype == x.dtype and supports(x))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self._kernel_applies(x):
                return layer_norm_rows(x, self.weight, self.bias, self.eps)
            return super().forward(x)

        def forward_plus(self, x: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
            """self(x) + addend, addend (P, C) broadcast over x (..., P, C): in the kernel's one pass where it
            applies (the addend in x's dtype and on its device), as two operations otherwise."""
            if (addend.dtype == x.dtype and addend.device == x.device and x.dim() >= 2
                    and addend.shape == (x.shape[-2], x.shape[-1]) and self._kernel_applies(x)):
                return layer_norm_rows(x, self.weight, self.bias, self.eps, addend=addend)
            return self(x) + addend

    LayerNormWithKernel.__name__ = LayerNormWithKernel.__qualname__ = f"{base.__name__}WithKernel"
    return LayerNormWithKernel
