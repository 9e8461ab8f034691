"""A convolution's bias added in one vectorised pass over its channels-last output (the uncompiled CUDA path).

PyTorch's cuDNN convolution leaves the bias out and adds it afterwards, `out.add_(bias.reshape(1, C, 1, 1))`. On a
channels-last output that broadcast sum runs PyTorch's generic, unvectorised elementwise kernel (the broadcast bias
makes the iteration non-contiguous): one extra read and write of every convolution's output at a fraction of the
memory bandwidth. Here the convolution runs without its bias and one Triton pass adds it over the (N*H*W, C) rows,
optionally with a residual of the same shape in the same pass (a ResBlock's `skip + conv(h)`: two passes become
one). A ResBlock's first convolution needs no pass at all: its bias joins the timestep shift its next GroupNorm
adds before its statistics (`forward_bias_apart`, `blocks.conv_then_norm_silu`).

`with_kernel(base)` (below; `fast_operations` uses it) runs this for CUDA half-precision, channels-last input outside
autograd and `torch.compile` (Inductor fuses the bias itself there), once a probe has seen it agree with PyTorch's
convolution; ``XPORTRAIT_CONV_BIAS_KERNEL=0`` or `set_conv_bias_kernel(False)` turns it off.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn as nn

from .probe import probed_once
from .switches import switched_on
from .triton_launch import launch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs usually lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_ROWS, BLOCK_CHANNELS = 32, 64

_enabled: bool = switched_on("XPORTRAIT_CONV_BIAS_KERNEL")
_works: dict[tuple[str, torch.dtype], bool] = {}


def set_conv_bias_kernel(enabled: bool) -> None:
    """Use (default) or bypass the convolution-bias kernel."""
    global _enabled
    _enabled = bool(enabled)


if triton is not None:

    @triton.jit
    def _add_bias_kernel(Y, B, R, OUT, rows_total, channels, HAS_RESIDUAL: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Program (row block, channel block) of OUT (rows, C) = Y + B[c] (+ R), all rows `channels` apart, in
        # float32 with one rounding.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < channels
        mask = (rows < rows_total)[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * channels + cols[None, :]
        y = tl.load(Y + offsets, mask=mask, other=0.0).to(tl.float32)
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            y += tl.load(R + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offsets, y.to(OUT.dtype.element_ty), mask=mask)


def _channels_last_4d(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def add_channel_bias(y: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor] = None,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y + bias[None, :, None, None] (+ residual) for y (N, C, H, W) in channels-last memory (a residual likewise),
    in one pass; written into `out` (y itself for an in-place sum), else a new channels-last tensor."""
    if not _channels_last_4d(y) or (residual is not None and (not _channels_last_4d(residual)
                                                                  or residual.shape != y.shape)):
        raise ValueError("add_channel_bias takes channels-last (N, C, H, W) tensors of one shape")
    channels = y.shape[1]
    if bias.shape != (channels,):
        raise ValueError(f"a bias of {channels} channels expected, got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty_like(y, memory_format=torch.channels_last)
    rows = y.numel() // channels
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(channels, BLOCK_CHANNELS))
    # Without a residual the kernel never reads R: y stands in for the pointer.
    launch(_add_bias_kernel, grid, y, bias.contiguous(), y if residual is None else residual, out, rows, channels,
           HAS_RESIDUAL=residual is not None, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_CHANNELS)
    return out


def _kernel_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs, and agrees with PyTorch's broadcast sum, for this device type and dtype (probed
    once): Triton can be installed yet unable to build its launcher (no C compiler, say)."""
    def agrees() -> bool:
        # Fixed values, not random ones: a probe must not move anyone's random stream. 80 channels: a ragged block.
        y = torch.arange(2 * 80 * 3 * 5, device=device, dtype=torch.float32).sin().reshape(2, 80, 3, 5)
        residual, bias = y.cos(), torch.linspace(-1, 1, 80, device=device)
        half = [t.to(dtype).contiguous(memory_format=torch.channels_last) for t in (y, residual)]
        out = add_channel_bias(half[0], bias.to(dtype), half[1]).float()
        expected = half[0].float() + bias.to(dtype).float()[None, :, None, None] + half[1].float()
        return torch.allclose(out, expected, atol=5e-2, rtol=2e-2)

    return probed_once(_works, "convolution-bias", "PyTorch's broadcast sum", device, dtype, agrees)


def supports(x: torch.Tensor) -> bool:
    """Whether `Conv2d` adds its bias with the kernel for input x: CUDA half precision, channels-last (and not also
    contiguous, as a 1x1 map is), no autograd, outside torch.compile, with the kernel on and working."""
    return (
        _enabled
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and triton is not None
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and _channels_last_4d(x)
        and not x.is_contiguous()
        and _kernel_usable(x.device, x.dtype)
    )


@functools.lru_cache(maxsize=None)
def with_kernel(base: type[nn.Module], defers: Optional[Callable[[nn.Module], bool]] = None) -> type[nn.Module]:
    """A subclass of the Conv2d class `base` (torch's constructor: the same checkpoint keys) whose convolution runs
    without its bias, the bias then added by the kernel above, on the input it `supports`; `base`'s forward on the
    rest: a layer whose weights lie on another device or in another dtype than the input, one without a bias, and
    any layer for which `defers(layer)` is true (a host's layers that cast or patch their weights as they run).
    It also offers the bias apart (`forward_bias_apart`) and the sum with a residual (`forward_plus`)."""

    class Conv2dWithBiasKernel(base):
        def _kernel_applies(self, x: torch.Tensor) -> bool:
            weight, bias = self.weight, self.bias
            return (bias is not None and not (defers is not None and defers(self))
                    and weight.device == x.device and weight.dtype == x.dtype
                    and bias.device == x.device and bias.dtype == x.dtype and supports(x))

        def _without_bias(self, x: torch.Tensor) -> torch.Tensor:
            y = self._conv_forward(x, self.weight, None)
            # cuDNN answers channels-last input in channels-last; anything else goes through PyTorch's layout.
            return y.contiguous(memory_format=torch.channels_last)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self._kernel_applies(x):
                y = self._without_bias(x)
                return add_channel_bias(y, self.bias, out=y)
            return super().forward(x)

        def forward_bias_apart(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
            """(the convolution without its bias, the bias) where the kernel applies, for a caller that adds the
            bias in a pass it makes anyway; (self(x), None) otherwise."""
            if self._kernel_applies(x):
                return self._without_bias(x), self.bias
            return self(x), None

        def forward_plus(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            """residual + self(x): the bias and the residual added in one pass where the kernel applies (a residual
            of the output's shape, dtype and layout)."""
            if self._kernel_applies(x) and residual.dtype == x.dtype and _channels_last_4d(residual):
                y = self._without_bias(x)
                if residual.shape == y.shape:
                    return add_channel_bias(y, self.bias, residual, out=y)
            return residual + self(x)

    Conv2dWithBiasKernel.__name__ = Conv2dWithBiasKernel.__qualname__ = f"{base.__name__}WithBiasKernel"
    return Conv2dWithBiasKernel
