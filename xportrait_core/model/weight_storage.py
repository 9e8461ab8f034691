"""Weights stored in a narrower dtype than the networks compute in (fp8 storage), for GPUs short of memory.

What is stored narrow: the weights and biases of every Linear and Conv2d of the four diffusion networks (UNet with
its motion modules, reference net, both ControlNets): nearly all of their bytes, and the weights sampling keeps on
the GPU. Everything else stays in the compute dtype: the networks' norms (a few thousand per-channel scales, which
the GroupNorm and LayerNorm kernels then still read as they are), buffers such as the motion modules' positional
encodings, and the whole VAE and text encoder (they run once per job, and ComfyUI keeps its own VAE and CLIP apart
likewise).

The narrow weights only work in layers that cast their weights to the input's dtype at every call
(`Operations.casts_weights`: ComfyUI's comfy.ops manual-cast classes, or `casting_operations()`); each call then
costs a conversion of that layer's weights. `XPortrait.dtype` stays the compute dtype (inputs and activations are
in it), `XPortrait.storage_dtype` says what the Linear and Conv2d weights are held in.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from .operations import Operations

# The networks whose Linear and Conv2d weights may be stored narrow.
STORED_NETWORKS = ("unet", "reference_net", "global_control", "local_control")
# The storage dtypes the networks run with (through casting layers): fp8 with a sign and a mantissa.
STORAGE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_narrow_storage(dtype: Optional[torch.dtype]) -> bool:
    """Whether `dtype` is one of the storage-only dtypes (fp8), which layers must cast from to compute."""
    return dtype in STORAGE_DTYPES


def check_storage(storage_dtype: torch.dtype, operations: Optional[Operations]) -> None:
    """Refuse a storage dtype the networks cannot run with, saying why."""
    if not is_narrow_storage(storage_dtype):
        names = ", ".join(str(d).replace("torch.", "") for d in STORAGE_DTYPES)
        raise ValueError(f"weights can be stored in {names}, not {str(storage_dtype).replace('torch.', '')}")
    if operations is None or not operations.casts_weights:
        raise ValueError("weights stored in fp8 need layers that cast them at every call: build the model from "
                         "operations with casts_weights (ComfyUI's comfy.ops manual cast, or casting_operations())")


def _stored_layers(model: nn.Module, networks: Iterable[str]) -> Iterable[tuple[str, nn.Module]]:
    for network in networks:
        module = getattr(model, network, None)
        if module is None:
            continue
        for name, layer in module.named_modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                yield f"{network}.{name}", layer


def stored_parameter_names(model: nn.Module) -> set[str]:
    """State-dict keys of the parameters held in the storage dtype: weight and bias of every Linear and Conv2d
    of the STORED_NETWORKS (a model built on the meta device answers as well as a loaded one)."""
    names = set()
    for prefix, layer in _stored_layers(model, STORED_NETWORKS):
        names.update(f"{prefix}.{name}" for name, p in layer.named_parameters(recurse=False) if p is not None)
    return names


@torch.no_grad()
def store_weights(model: nn.Module, storage_dtype: torch.dtype) -> nn.Module:
    """Hold `model`'s stored parameters (`stored_parameter_names`) in `storage_dtype`, in place, one at a time (the
    full-width copy of one layer at most is alive beside them). The model must be built from casting layers."""
    check_storage(storage_dtype, getattr(model, "operations", None))
    for _prefix, layer in _stored_layers(model, STORED_NETWORKS):
        for name, parameter in list(layer.named_parameters(recurse=False)):
            if parameter is not None and parameter.dtype != storage_dtype:
                setattr(layer, name, nn.Parameter(parameter.to(storage_dtype), requires_grad=False))
    return model
