"""What every X-Portrait node shares: ComfyUI's services (progress, interruption, model management, model
folders) behind small functions that also work without ComfyUI, and the conversions between ComfyUI's tensors
and the core's arrays.

Nothing here imports torch or the core at import time: ComfyUI imports the pack at start-up, and importing it
outside ComfyUI (tests, linters, the registry's scanner) must stay cheap and must not fail.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Optional

log = logging.getLogger("xportrait")

CATEGORY = "X-Portrait"

# Custom socket types. Only X-Portrait nodes produce or accept them, so the frontend lets users wire our objects
# only between our nodes.
MODEL_TYPE = "XPORTRAIT_MODEL"
REFERENCE_TYPE = "XPORTRAIT_REFERENCE"
MOTION_TYPE = "XPORTRAIT_MOTION"

MODEL_FOLDER = "xportrait"
# Outside ComfyUI (tests, scripts) model files are looked up here instead of in ComfyUI's models/xportrait.
MODEL_DIR_ENV = "XPORTRAIT_MODELS_DIR"

try:  # ComfyUI present
    import folder_paths as _folder_paths
except ImportError:  # plain Python / pytest
    _folder_paths = None

# Typed in ComfyUI's node search, these find the pack's nodes (newer ComfyUI versions read `SEARCH_ALIASES`).
SEARCH_ALIASES = ["portrait animation", "face reenactment", "talking head", "animate portrait", "x-portrait"]


def model_extensions() -> tuple[str, ...]:
    """The checkpoint suffixes (defined once, by the core's checkpoint reader)."""
    from xportrait_core.model.checkpoint import CHECKPOINT_SUFFIXES

    return CHECKPOINT_SUFFIXES


# ---- model folder ------------------------------------------------------------------------------------------------

def register_model_folder() -> None:
    """Make `models/xportrait` a ComfyUI model folder listing only checkpoint files.

    extra_model_paths.yaml is read before custom nodes load, so an `xportrait:` entry there may already exist (with
    no extension filter): its folders are kept, and the default folder is added after them.
    """
    if _folder_paths is None:
        return
    paths, _ = _folder_paths.folder_names_and_paths.get(MODEL_FOLDER, ([], set()))
    default = os.path.join(_folder_paths.models_dir, MODEL_FOLDER)
    if default not in paths:
        paths.append(default)
    _folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(model_extensions()))
    try:  # shows users where the weights go; harmless when the models folder is read-only
        os.makedirs(default, exist_ok=True)
    except OSError:
        pass


def _fallback_model_dirs() -> list[str]:
    value = os.environ.get(MODEL_DIR_ENV, "")
    return [p for p in value.split(os.pathsep) if p]


def list_model_files() -> list[str]:
    if _folder_paths is not None:
        return _folder_paths.get_filename_list(MODEL_FOLDER)
    names = set()
    for folder in _fallback_model_dirs():
        for root, _dirs, files in os.walk(folder, followlinks=True):
            for name in files:
                if name.lower().endswith(model_extensions()):
                    names.add(os.path.relpath(os.path.join(root, name), folder))
    return sorted(names)


def model_folders() -> list[str]:
    """The folders searched for X-Portrait checkpoints (ComfyUI's models/xportrait and extra_model_paths.yaml)."""
    if _folder_paths is not None:
        return list(_folder_paths.get_folder_paths(MODEL_FOLDER))
    return _fallback_model_dirs()


def missing_model_message(name: str) -> Optional[str]:
    """None when `name` is a listed checkpoint; else what to do, naming the file and the folders searched."""
    node = "X-Portrait Load Model"
    if name and name in list_model_files():
        return None
    folders = " or ".join(model_folders()) or "ComfyUI/models/xportrait"
    if not name:
        return (f"{node}: no X-Portrait model in {folders}: put model_state-415001.th (or its .safetensors "
                "conversion) there, then press R in ComfyUI to refresh the list")
    return (f"{node}: model file {name!r} is not in {folders}: put it there (the X-Portrait release's "
            "model_state-415001.th, or its .safetensors conversion), then press R in ComfyUI to refresh the list")


def model_file_path(name: str) -> str:
    """Full path of a file listed by `list_model_files`; a clear error naming the searched folders otherwise."""
    node = "X-Portrait Load Model"
    if not name:
        raise ValueError(f"{node}: no model selected: put model_state-415001.th (or its .safetensors conversion) "
                         "in ComfyUI/models/xportrait, then press R (refresh) in ComfyUI")
    if not name.lower().endswith(model_extensions()):
        raise ValueError(f"{node}: {name!r} is not an X-Portrait checkpoint file (expected "
                         f"{', '.join(model_extensions())})")
    if _folder_paths is not None:
        path = _folder_paths.get_full_path(MODEL_FOLDER, name)
        folders = _folder_paths.get_folder_paths(MODEL_FOLDER)
    else:
        folders = _fallback_model_dirs()
        path = next((os.path.join(f, name) for f in folders if os.path.isfile(os.path.join(f, name))), None)
    if path is None:
        raise FileNotFoundError(f"{node}: model {name!r} not found in {', '.join(folders) or '(no folder)'}: put it "
                                "there, then press R (refresh) in ComfyUI")
    return path


# ---- progress and interruption --------------------------------------------------------------------------------

class _FallbackInterrupt:
    """Outside ComfyUI, tests raise this flag to check that nodes stop between model calls."""

    requested = False


class Interrupted(Exception):
    """Raised outside ComfyUI where ComfyUI would raise its InterruptProcessingException."""


def request_interrupt(value: bool = True) -> None:
    """Ask the running node to stop at its next check (ComfyUI's Cancel button does this inside ComfyUI)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        _FallbackInterrupt.requested = value
        return
    mm.interrupt_current_processing(value)


def processing_interrupted() -> bool:
    try:
        import comfy.model_management as mm
    except ImportError:
        return _FallbackInterrupt.requested
    return mm.processing_interrupted()


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interruption (which it reports as 'interrupted', not as an error) and clear the flag."""
    try:
        import comfy.model_management as mm
    except ImportError:
        if _FallbackInterrupt.requested:
            _FallbackInterrupt.requested = False
            raise Interrupted("X-Portrait: processing interrupted")
        return
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """A ComfyUI progress bar fed by the core's `progress(done, total)` callbacks.

    `updates` records every (done, total) so tests can check that progress was reported without ComfyUI.
    """

    def __init__(self, total: int = 1):
        self.updates: list[tuple[int, int]] = []
        try:
            from comfy.utils import ProgressBar
        except ImportError:
            self._bar = None
        else:
            self._bar = ProgressBar(max(1, int(total)))

    def __call__(self, done: int, total: int, preview=None) -> None:
        self.updates.append((int(done), int(total)))
        if self._bar is not None:
            self._bar.update_absolute(int(done), max(1, int(total)), preview)

    def show(self, preview) -> None:
        """Send a preview image (ComfyUI's ("JPEG", image, size) tuple) with the progress reached so far."""
        done, total = self.updates[-1] if self.updates else (0, 1)
        if self._bar is not None:
            self._bar.update_absolute(done, max(1, total), preview)


def latent_previewer() -> Optional[Callable[[Any], Any]]:
    """ComfyUI's preview of SD1.5 latents, as its --preview-method asks:
    latents (1, 4, h, w), scaled as the model sees them -> a preview for `Progress.show`. None outside ComfyUI or
    with previews off."""
    try:
        import comfy.latent_formats
        import latent_preview
    except ImportError:
        return None
    previewer = latent_preview.get_previewer(torch_device(), comfy.latent_formats.SD15())
    if previewer is None:
        return None
    return lambda latents: previewer.decode_latent_to_preview_image("JPEG", latents)


def interruptible_progress(total: int) -> Callable[[int, int], None]:
    """A `progress(done, total)` callback for slow per-frame core work (face landmarks, face descriptors): it
    raises ComfyUI's interruption at the next frame once Cancel was pressed, then moves the progress bar."""
    bar = Progress(total)

    def report(done: int, total: int) -> None:
        throw_if_interrupted()
        bar(done, total)

    return report


def run_cancellable(work: Callable[[Callable[[], bool]], Any]) -> Any:
    """Run `work(should_cancel)`; when the core stops because of the interruption (`SamplingCancelled`), raise
    ComfyUI's own interruption instead, which ComfyUI reports as "interrupted" rather than as an error."""
    from xportrait_core.sampling.sampler import SamplingCancelled

    try:
        return work(processing_interrupted)
    except SamplingCancelled:
        throw_if_interrupted()
        raise


# ---- model management -------------------------------------------------------------------------------------------

def torch_device():
    """The device ComfyUI computes on (its --cpu / --gpu-only / device choice), or CUDA when available elsewhere."""
    import torch

    try:
        import comfy.model_management as mm
    except ImportError:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return mm.get_torch_device()


def offload_device():
    import torch

    try:
        import comfy.model_management as mm
    except ImportError:
        return torch.device("cpu")
    return mm.unet_offload_device()


def apply_pinned_memory_setting() -> None:
    """ComfyUI's --disable-pinned-memory reaches the core: no page-locked hint images either."""
    from xportrait_core.sampling import pinned_hints

    pinned_hints.allow_page_locked(pinned_memory_allowed())


def pinned_memory_allowed() -> bool:
    """False when ComfyUI was started with --disable-pinned-memory (newer ComfyUI versions have the flag)."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return True
    return not getattr(args, "disable_pinned_memory", False)


def auto_dtype(device):
    """The dtype ComfyUI would pick for a UNet on this device (fp16/bf16 where fast, fp32 on CPU)."""
    import torch

    try:
        import comfy.model_management as mm
    except ImportError:
        return torch.float16 if device.type == "cuda" else torch.float32
    return mm.unet_dtype(device=device, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])


def soft_empty_cache() -> None:
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.soft_empty_cache()


# ---- ComfyUI tensors <-> core arrays --------------------------------------------------------------------------

def image_batch(image, what: str):
    """A ComfyUI IMAGE (B, H, W, C) float 0..1 as a float32 numpy array, refusing empty or malformed batches."""
    import numpy as np

    if image is None:
        raise ValueError(f"{what}: no image connected")
    array = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, np.float32)
    if array.ndim == 3:  # a single (H, W, C) image
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what}: expected an IMAGE batch (B, H, W, C) with C in 1/3/4, got shape {tuple(array.shape)}")
    if array.shape[0] == 0:
        raise ValueError(f"{what}: the image batch is empty (0 images)")
    if array.shape[1] == 0 or array.shape[2] == 0:
        raise ValueError(f"{what}: images of size {array.shape[2]}x{array.shape[1]} are empty")
    require_finite(array, what)
    return array


def to_image(frames):
    """Core frames (N, H, W, C) float in [0, 1] (numpy or torch) -> ComfyUI IMAGE, float32 on the CPU."""
    import torch

    tensor = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(frames)
    if tensor.ndim == 3:
        tensor = tensor[None]
    return tensor.detach().to("cpu", torch.float32).contiguous()


def to_comfy_latent(latents, scale_factor: float):
    """Core latents (scaled by the VAE factor, as the UNet sees them) -> ComfyUI LATENT samples, which hold the
    VAE's own unscaled latents (ComfyUI's SD1.5 latent format applies the 0.18215 inside its models)."""
    import torch

    return (latents.detach().to("cpu", torch.float32) / float(scale_factor)).contiguous()


def hints_to_image(hints):
    """Motion hints (N, 3, R, R) in [-1, 1] -> ComfyUI IMAGE (N, R, R, 3) in [0, 1], for previews."""
    import torch

    tensor = torch.as_tensor(hints).detach().to("cpu", torch.float32)
    return ((tensor.permute(0, 2, 3, 1) + 1.0) * 0.5).clamp(0.0, 1.0).contiguous()


def to_mask(mask):
    """Core mask (B, H, W) or (H, W) float in [0, 1] -> ComfyUI MASK (B, H, W), float32 on the CPU."""
    import torch

    tensor = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(mask)
    if tensor.ndim == 2:
        tensor = tensor[None]
    return tensor.detach().to("cpu", torch.float32).contiguous()


def mask_batch(mask, what: str = "mask") -> Any | None:
    """A ComfyUI MASK (B, H, W) or (H, W) as float32 numpy (B, H, W), or None."""
    if mask is None:
        return None
    import numpy as np

    array = mask.detach().cpu().float().numpy() if hasattr(mask, "detach") else np.asarray(mask, np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] == 0:
        raise ValueError(f"{what}: expected a MASK (B, H, W), got shape {tuple(array.shape)}")
    require_finite(array, what)
    return array


# ---- non-finite values ------------------------------------------------------------------------------------------

def require_finite(values, what: str) -> None:
    """Refuse NaN or infinite numbers in an input (numpy array or torch tensor); `what` is "Node: input".

    One NaN spreads through attention to every pixel of every frame: refusing it at the node that receives it
    names the culprit, where the all-NaN output would name nothing.
    """
    import numpy as np

    if hasattr(values, "detach"):
        import torch

        bad = int((~torch.isfinite(values.detach())).sum().item()) if values.is_floating_point() else 0
        size = values.numel()
    else:
        array = np.asarray(values)
        bad = int((~np.isfinite(array)).sum()) if np.issubdtype(array.dtype, np.floating) else 0
        size = array.size
    if bad:
        raise ValueError(f"{what} holds {bad} NaN or infinite values (of {size}): the node that made it produced "
                         "invalid numbers; fix that node (e.g. a VAE Decode in fp16 that overflowed) or its inputs")


def check_outputs(node: str, cause: str, **outputs) -> None:
    """Refuse to emit NaN or infinite numbers: raise naming the output and the likely `cause` instead."""
    for name, value in outputs.items():
        try:
            require_finite(value, f"{node}: output {name}")
        except ValueError:
            raise ValueError(f"{node}: the {name} came out with NaN or infinite values: {cause}") from None


def check_widgets(node_class, values: dict, node: str) -> "bool | str":
    """Check a node's widget values: numbers finite and within the widget's limits, choices among the listed
    ones. True, or the problem in words, starting with the node's name.

    Used by `VALIDATE_INPUTS` (queue time: ComfyUI shows the text in its validation dialog, and skips its own range
    check for the inputs VALIDATE_INPUTS takes, so this does it) and by the nodes when they run: NaN passes
    ComfyUI's range checks, and a widget turned into an input is not checked at queue time. Values of connected
    inputs are None at queue time and are skipped.
    """
    import math

    spec = node_class.INPUT_TYPES()
    inputs = {**spec.get("required", {}), **spec.get("optional", {})}
    for name, value in values.items():
        if name not in inputs or value is None:
            continue
        kind, options = inputs[name][0], (inputs[name][1] if len(inputs[name]) > 1 else {})
        if isinstance(kind, (list, tuple)):
            if value not in kind:
                return f"{node}: {name} is {value!r}; choose one of {', '.join(map(str, kind))}"
        elif kind in ("INT", "FLOAT"):
            try:
                number = float(value)
            except (TypeError, ValueError):
                return f"{node}: {name} must be a number, got {value!r}"
            if not math.isfinite(number):
                return f"{node}: {name} must be a finite number, got {value!r}"
            low, high = options.get("min"), options.get("max")
            if (low is not None and number < low) or (high is not None and number > high):
                return f"{node}: {name} is {value}; it must be between {low} and {high}"
    return True


# ---- what the user sees on the node ---------------------------------------------------------------------------

def show_text(text: str, node_id) -> None:
    """Show `text` under the node in ComfyUI's frontend (as core nodes do), while the prompt runs."""
    if node_id is None or not text:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None and hasattr(instance, "send_progress_text"):
        instance.send_progress_text(text, node_id)


def with_report(result: tuple, lines: list[str], node_id=None) -> dict:
    """A node's return value with `lines` as its UI text: shown on the node and kept in ComfyUI's history (and so
    visible to API clients) next to the outputs. Warnings go here rather than only to the server console."""
    text = "\n".join(lines)
    show_text(text, node_id)
    return {"ui": {"text": [text]} if text else {}, "result": tuple(result)}
