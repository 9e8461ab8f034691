"""X-Portrait Load LoRA: an SD1.5 UNet LoRA (e.g. the LCM-LoRA) from ComfyUI's models/loras on the X-Portrait UNet.

Inside ComfyUI the LoRA becomes weight patches on a clone of the model's ModelPatcher, as core LoRA loaders do:
ComfyUI applies them when the model is loaded for sampling and takes them off again for a model without them, so
the input model's weights never change and re-running the graph never merges twice. Outside ComfyUI the output
model gets its own merged copy of the UNet and shares every other network.
"""
from __future__ import annotations

import copy
import logging
import os

from . import common
from .loader import check_model

log = logging.getLogger("xportrait")

NODE = "X-Portrait Load LoRA"
LORA_FOLDER = "loras"
# Outside ComfyUI (tests, scripts) LoRA files are looked up here instead of in ComfyUI's models/loras.
LORA_DIR_ENV = "XPORTRAIT_LORAS_DIR"
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".pth", ".bin")


def _fallback_dirs() -> list[str]:
    return [p for p in os.environ.get(LORA_DIR_ENV, "").split(os.pathsep) if p]


def list_lora_files() -> list[str]:
    try:
        import folder_paths
    except ImportError:
        names = set()
        for folder in _fallback_dirs():
            for root, _dirs, files in os.walk(folder, followlinks=True):
                names.update(os.path.relpath(os.path.join(root, f), folder) for f in files
                             if f.lower().endswith(LORA_EXTENSIONS))
        return sorted(names)
    return folder_paths.get_filename_list(LORA_FOLDER)


def lora_file_path(name: str) -> str:
    if not name:
        raise ValueError(f"{NODE}: no LoRA selected: put an SD1.5 LoRA (e.g. the LCM-LoRA, lcm-lora-sdv1-5) in "
                         "ComfyUI/models/loras and refresh")
    try:
        import folder_paths
    except ImportError:
        folders = _fallback_dirs()
        path = next((os.path.join(f, name) for f in folders if os.path.isfile(os.path.join(f, name))), None)
    else:
        folders = folder_paths.get_folder_paths(LORA_FOLDER)
        path = folder_paths.get_full_path(LORA_FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"{NODE}: LoRA {name!r} not found in {', '.join(folders) or '(no folder)'}")
    return path


def _patched_clone(handle, state, lora, strength: float):
    """The handle with a clone of its ModelPatcher carrying the LoRA as ComfyUI weight patches."""
    import comfy.lora

    patched = copy.copy(handle)
    patched.patcher = handle.patcher.clone()
    if strength != 0:
        # The patcher names the weights from its own wrapper module: find ours among them by identity.
        managed = {id(p): name for name, p in patched.patcher.model.named_parameters()}
        unet = dict(handle.model.unet.named_parameters())
        key_map = {module: managed[id(unet[param])] for module, param in lora.file_modules.items()}
        patches = comfy.lora.load_lora(state, key_map, log_missing=False)
        patched.patcher.add_patches(patches, strength)
    return patched


class LoadLoRA:
    DESCRIPTION = ("Applies an SD1.5 UNet LoRA (kohya or diffusers format) to the X-Portrait UNet. With the LCM-LoRA "
                   "(lcm-lora-sdv1-5), set the X-Portrait Sampler's sampler to 'lcm' with 4-8 steps and guidance "
                   "1-2. The reference net and the motion ControlNets are left as they are; the input model is "
                   "not changed, so other branches of the graph keep the plain model.")
    CATEGORY = common.CATEGORY
    SEARCH_ALIASES = common.SEARCH_ALIASES + ["lora", "lcm"]
    RETURN_TYPES = (common.MODEL_TYPE,)
    RETURN_NAMES = ("xportrait_model",)
    OUTPUT_TOOLTIPS = ("The X-Portrait model with the LoRA on its UNet, for the Sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "xportrait_model": (common.MODEL_TYPE, {"tooltip": "From X-Portrait Load Model (or another "
                                                                   "X-Portrait Load LoRA, to stack LoRAs)."}),
                "lora_name": (list_lora_files(), {
                    "tooltip": "An SD1.5 LoRA in ComfyUI/models/loras, e.g. the LCM-LoRA "
                               "(latent-consistency/lcm-lora-sdv1-5, saved under a name of your choice)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "How much of the LoRA is added to the UNet's weights "
                                                  "(0: none, 1: as trained)."}),
            },
        }

    def load(self, xportrait_model, lora_name: str, strength: float = 1.0):
        handle = check_model(xportrait_model, NODE)
        # NaN passes ComfyUI's range check, and a widget turned into an input is not checked at queue time.
        checked = common.check_widgets(type(self), {"strength": strength}, NODE)
        if checked is not True:
            raise ValueError(checked)
        path = lora_file_path(lora_name)

        from xportrait_core.model.lora import LoraError, read_lora_file, unet_lora, warn_unmatched, with_merged_unet

        try:
            state = read_lora_file(path)
            lora = unet_lora(state, handle.config.unet, os.path.basename(path))
        except LoraError as exc:
            raise ValueError(f"{NODE}: {exc}") from exc
        warn_unmatched(lora)
        if handle.patcher is not None:
            patched = _patched_clone(handle, state, lora, float(strength))
        else:
            patched = copy.copy(handle)
            patched.model = with_merged_unet(handle.model, lora, float(strength))
        log.info("X-Portrait: LoRA %s on the UNet at strength %g (%d weights)", lora_name, strength,
                 len(lora.factors))
        return (patched,)


NODE_CLASS_MAPPINGS = {"XPortraitLoadLoRA": LoadLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"XPortraitLoadLoRA": "X-Portrait Load LoRA"}
