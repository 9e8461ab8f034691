"""The layer classes and functions every network is built from, chosen once and handed to the model.

`XPortrait(config, operations=...)` passes one `Operations` down to the UNet, reference net, ControlNets, motion
modules, VAE and text encoder; no model file names a layer class or attention function of its own. Swapping a
field (`dataclasses.replace(ops, Linear=...)`) changes what every network is built from: the accelerated set of
`xportrait_core/fast/operations.py`, or a host's own layer classes (ComfyUI's `comfy.ops`, whose partial loading
and low-precision weight storage work through them). Module classes keep torch's constructor signatures, so
checkpoint keys stay the same whichever set builds the model.

A set whose Linear and Conv2d cast their weights to the input's dtype and device at every call says so
(`casts_weights`): only such a set can run weights stored in another dtype than the networks compute in
(weight_storage.py), and `casting_operations` gives one without a host.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention as dispatched_attention


@dataclass(frozen=True)
class Operations:
    """Linear, Conv2d, GroupNorm, LayerNorm: nn.Module classes with torch's constructor signatures.
    attention(q, k, v, *, causal=False): softmax(q k^T / sqrt(d)) v on (B, H, N, D) tensors.
    gated_gelu(projection): a GEGLU projection (..., 2d) = [value | gate] -> value * gelu(gate), (..., d).
    casts_weights: Linear and Conv2d cast their weights (and biases) to the input's dtype and device at every call,
    so their weights may be held in another dtype (fp8 storage) or on another device than the activations."""

    Linear: type[nn.Module]
    Conv2d: type[nn.Module]
    GroupNorm: type[nn.Module]
    LayerNorm: type[nn.Module]
    attention: Callable[..., torch.Tensor]
    gated_gelu: Callable[[torch.Tensor], torch.Tensor]
    casts_weights: bool = False


class GroupNorm(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the activations' dtype, as the official UNet computes it.

    CUDA's half-precision group_norm kernels already accumulate in float32, so there the half tensor goes in as it
    is (an explicit upcast would only add two full passes over the activations); elsewhere it is upcast.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or x.is_cuda:
            dtype = x.dtype
        else:
            dtype, x = x.dtype, x.float()
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps).to(dtype)


def gated_gelu(projection: torch.Tensor) -> torch.Tensor:
    """value * gelu(gate) of a GEGLU projection [value | gate] (exact, erf-based gelu)."""
    value, gate = projection.chunk(2, dim=-1)
    if torch.is_grad_enabled():
        return value * F.gelu(gate)
    # Inference: multiply into gelu's fresh output, one activation-sized buffer fewer at the memory peak (the
    # feed-forward's inner activations are the largest of the UNet).
    return F.gelu(gate).mul_(value)


class CastingLinear(nn.Linear):
    """nn.Linear whose weight and bias are cast to the input's dtype and device at every call (they may be held in
    fp8, or elsewhere); a cast to what they already are is free."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, self.weight.to(device=x.device, dtype=x.dtype), bias)


class CastingConv2d(nn.Conv2d):
    """nn.Conv2d whose weight and bias are cast to the input's dtype and device at every call (see CastingLinear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return self._conv_forward(x, self.weight.to(device=x.device, dtype=x.dtype), bias)


def casting_operations(base: Optional[Operations] = None) -> Operations:
    """`base` (None: plain PyTorch) with Linear and Conv2d that cast their weights at every call: what a model
    whose weights are stored in fp8 runs on outside a host with its own casting layers (ComfyUI's comfy.ops)."""
    return dataclasses.replace(operations_or_default(base), Linear=CastingLinear, Conv2d=CastingConv2d,
                               casts_weights=True)


@functools.lru_cache(maxsize=1)
def torch_operations() -> Operations:
    """Plain PyTorch: torch's layers, GroupNorm with float32 statistics, the attention dispatch of attention.py
    (xformers, SDPA or math)."""
    return Operations(Linear=nn.Linear, Conv2d=nn.Conv2d, GroupNorm=GroupNorm, LayerNorm=nn.LayerNorm,
                      attention=dispatched_attention, gated_gelu=gated_gelu)


def operations_or_default(operations: Optional[Operations]) -> Operations:
    """`operations`, or the plain-PyTorch set where none is given."""
    return torch_operations() if operations is None else operations
