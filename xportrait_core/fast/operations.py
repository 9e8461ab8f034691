"""The accelerated operations: a model built from `fast_operations()` runs the pack's CUDA kernels where they apply.

Five fields of the plain set are swapped: Conv2d (its bias added by the kernel of conv_bias.py), GroupNorm (the
channels-last kernel of group_norm.py), LayerNorm (the kernel of layer_norm.py), gated_gelu (the GEGLU kernel of
geglu.py) and attention (the frame-attention kernel of frame_attention.py in front of the base's dispatch). Each
kernel still decides at every call whether it applies (CUDA, half precision, outside autograd or torch.compile
where that matters, its switch on, its probe passed) and hands the call to the base's layer or function otherwise,
so the same model runs anywhere and computes the same values. The layer classes are subclasses of the base's (same
constructor, same checkpoint keys), so a host's own classes (ComfyUI's `comfy.ops`, given as `base`) keep working
under them; Linear stays the base's.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ..model.operations import Operations, operations_or_default
from . import conv_bias, frame_attention, geglu, group_norm, layer_norm


def fast_operations(base: Optional[Operations] = None,
                    defers: Optional[Callable[[torch.nn.Module], bool]] = None) -> Operations:
    """`base` (None: plain PyTorch) with the pack's kernels in front of its Conv2d, GroupNorm, LayerNorm, gated_gelu
    and attention.

    defers(layer): true for a base layer that must run its own forward this call (a host's layer that casts or
    patches its weights as it runs); the Conv2d, GroupNorm and LayerNorm kernels then stand aside."""
    base = operations_or_default(base)
    return dataclasses.replace(base, Conv2d=conv_bias.with_kernel(base.Conv2d, defers),
                               GroupNorm=group_norm.with_kernel(base.GroupNorm, defers),
                               LayerNorm=layer_norm.with_kernel(base.LayerNorm, defers),
                               gated_gelu=geglu.with_kernel(base.gated_gelu),
                               attention=frame_attention.with_kernel(base.attention))


def probe_kernels(device: torch.device, dtype: torch.dtype) -> dict[str, bool]:
    """Run each kernel's one-time probe for this device type and dtype now, outside any compiled code (a probe
    inside a graph being traced would be traced too); returns which kernels will run."""
    device = torch.device(device)
    # The kernels take CUDA half precision only; elsewhere nothing is probed.
    applies = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    return {"frame_attention": applies and frame_attention.kernel_usable(device, dtype),
            "group_norm": applies and group_norm.triton is not None and group_norm._kernel_usable(device, dtype),
            "geglu": applies and geglu.triton is not None and geglu._kernel_usable(device, dtype),
            "layer_norm": applies and layer_norm.triton is not None and layer_norm._kernel_usable(device, dtype),
            "conv_bias": applies and conv_bias.triton is not None and conv_bias._kernel_usable(device, dtype)}
