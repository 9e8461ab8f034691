"""X-Portrait as a native ComfyUI model: the adapter behind the loader's MODEL output, its CLIP and VAE, and the
conditioning node. Everything that imports ComfyUI is imported lazily, so the pack loads without it."""
from . import conditioning

NODE_CLASS_MAPPINGS = dict(conditioning.NODE_CLASS_MAPPINGS)
NODE_DISPLAY_NAME_MAPPINGS = dict(conditioning.NODE_DISPLAY_NAME_MAPPINGS)


def comfy_outputs(handle):
    """(MODEL, CLIP, VAE) for a LoadedXPortrait, or (None, None, None) outside ComfyUI."""
    try:
        import comfy.model_patcher  # noqa: F401
    except ImportError:
        return None, None, None
    from .. import common
    from .adapter import model_patcher
    from .comfy_types import comfy_clip, comfy_vae

    patcher = model_patcher(handle.model, common.torch_device(), common.offload_device())
    return patcher, comfy_clip(handle.model), comfy_vae(handle.model)
