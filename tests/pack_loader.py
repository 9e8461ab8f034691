"""Import the repository root the way ComfyUI does: as a package loaded by path from custom_nodes/.

The tests of the ComfyUI nodes share this, so every test sees the same node classes (one package object).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_xportrait"


def load_pack():
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules[PACKAGE]
            raise
    return sys.modules[PACKAGE]


def node_classes() -> dict:
    return load_pack().NODE_CLASS_MAPPINGS


def tiny_checkpoint_with_text_encoder(golden_state_dict_path, destination: Path, seed: int = 0) -> Path:
    """The golden tiny weights plus a seeded random tiny CLIP text encoder, in our key format: a checkpoint whose
    model can encode the empty prompt itself, as the released one can."""
    import torch
    from safetensors.torch import save_file

    from xportrait_core.model.checkpoint import load_xportrait
    from xportrait_core.model.config import XPortraitConfig
    from xportrait_core.model.text_encoder import CLIPTextEncoder

    model = load_xportrait(golden_state_dict_path, XPortraitConfig.tiny())
    torch.manual_seed(seed)
    encoder = CLIPTextEncoder(XPortraitConfig.tiny().text_encoder)  # torch's default (seeded) initialisation
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.update({f"text_encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()})
    save_file(state, str(destination))
    return destination


def run_node(name: str, **inputs):
    """The node's outputs, as the next node receives them (its UI text, if any, is in `run_node_ui`)."""
    return run_node_ui(name, **inputs)[0]


def run_node_ui(name: str, **inputs):
    """(outputs, UI dict): a node returns either its outputs or {"ui": ..., "result": outputs}, as ComfyUI allows."""
    cls = node_classes()[name]
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    if isinstance(out, dict):
        assert set(out) == {"ui", "result"} and len(out["result"]) == len(cls.RETURN_TYPES)
        return out["result"], out["ui"]
    return out, {}
