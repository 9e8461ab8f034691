"""The layer classes of the networks inside ComfyUI: ComfyUI's own (`comfy.ops`), so its memory manager can load
them partially (--lowvram: layers left in system memory are cast onto the GPU as they run) and store weights in
a lower precision than they compute in (fp8), on every X-Portrait network.
"""
from __future__ import annotations

import dataclasses


def comfy_compute_dtype(weight_dtype, compute_device):
    """The dtype ComfyUI computes in for weights held in `weight_dtype` on this device, as it decides for a UNet
    (`unet_manual_cast`: fp16 or bf16 on a GPU that runs them, float32 on a CPU); None where it computes in the
    weights' own dtype, or outside ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return None
    return mm.unet_manual_cast(weight_dtype, compute_device)


def comfy_operations(weight_dtype, compute_device):
    """The pack's operations (its CUDA kernels where they apply) in front of ComfyUI's Linear, Conv2d, GroupNorm
    and LayerNorm, as ComfyUI picks them for this weight dtype on this device; None outside ComfyUI. Where ComfyUI
    computes in another dtype than the weights' (fp8 storage), its layers cast their weights at every call, and the
    operations say so (`casts_weights`)."""
    try:
        import comfy.ops
    except ImportError:
        return None

    from xportrait_core.fast.operations import fast_operations
    from xportrait_core.model.operations import operations_or_default

    layers = comfy.ops.pick_operations(weight_dtype, comfy_compute_dtype(weight_dtype, compute_device),
                                       load_device=compute_device)
    base = dataclasses.replace(operations_or_default(None), Linear=layers.Linear, Conv2d=layers.Conv2d,
                               GroupNorm=layers.GroupNorm, LayerNorm=layers.LayerNorm,
                               casts_weights=bool(getattr(layers.Linear, "comfy_cast_weights", False)))
    return fast_operations(base, defers=casts_weights_now)


def casts_weights_now(layer) -> bool:
    """Whether a ComfyUI layer casts or patches its weights in this call: a layer left in system memory by
    partial loading, stored in another dtype than it computes in, or carrying LoRA patches applied on the fly.
    The pack's GroupNorm and LayerNorm kernels read the weights as stored, so they leave such a layer to ComfyUI's
    forward."""
    return bool(getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None)
                or getattr(layer, "bias_function", None))
