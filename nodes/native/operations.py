"""The layer classes of the networks inside ComfyUI: ComfyUI's own (`comfy.ops`), so its memory manager can load
them partially (--lowvram: layers left in system memory are cast onto the GPU as they run) and store weights in
a lower precision than they compute in, on every X-Portrait network.
"""
from __future__ import annotations

import dataclasses


def comfy_operations(weight_dtype, compute_device):
    """The pack's operations (its CUDA kernels where they apply) with ComfyUI's Linear, Conv2d, GroupNorm and
    LayerNorm, as ComfyUI picks them for this weight dtype on this device; None outside ComfyUI."""
    try:
        import comfy.model_management as mm
        import comfy.ops
    except ImportError:
        return None

    from xportrait_core.fast.operations import fast_operations

    compute_dtype = mm.unet_manual_cast(weight_dtype, compute_device)
    layers = comfy.ops.pick_operations(weight_dtype, compute_dtype, load_device=compute_device)
    return dataclasses.replace(fast_operations(), Linear=layers.Linear, Conv2d=layers.Conv2d,
                               GroupNorm=layers.GroupNorm, LayerNorm=layers.LayerNorm)
