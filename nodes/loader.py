"""X-Portrait Load Model: a checkpoint from models/xportrait, placed on the GPU by ComfyUI's model management."""
from __future__ import annotations

import logging
import os

from . import common

log = logging.getLogger("xportrait")

ATTENTION_BACKENDS = ("auto", "xformers", "sdpa")
VRAM_MODES = ("normal", "low")

_managed_class = None


def _managed_module(model, low_vram: bool = False):
    """Wrap the network for ComfyUI's ModelPatcher, which sets `device` and bookkeeping attributes on the module
    it manages; `XPortrait.device` is a read-only property, so the wrapper carries them instead.

    In low-VRAM mode the wrapper holds only the networks that stay on the GPU: ComfyUI then loads, counts and
    offloads those (about two thirds of the weights), while the reference net and VAE stay in system memory and
    visit the GPU under the sampler's own placement, for which `ready` asks room.
    """
    global _managed_class
    if _managed_class is None:
        from torch import nn

        class ManagedXPortrait(nn.Module):
            def __init__(self, inner, networks=None):
                super().__init__()
                if networks is None:
                    self.xportrait = inner
                else:
                    self.networks = nn.ModuleDict(networks)
                self.device = inner.device

        _managed_class = ManagedXPortrait
    if low_vram:
        from xportrait_core.fast.offload import gpu_networks

        return _managed_class(model, gpu_networks(model))
    return _managed_class(model)


class LoadedXPortrait:
    """What travels on an XPORTRAIT_MODEL socket: the network, its name, and ComfyUI's handle on its weights."""

    def __init__(self, model, name: str, attention: str, low_vram: bool = False, compile: bool = False):
        self.model = model
        self.name = name
        self.attention = attention
        self.low_vram = low_vram
        self.compile = compile
        self._compiled = False
        self.patcher = None
        self.comfy_model = None  # the MODEL output's ModelPatcher, over the same networks
        from xportrait_core.fast.kept_graphs import KeptSamplerGraphs

        # The X-Portrait Sampler's CUDA graphs, kept for its next run of the same sizes and settings.
        self.kept_graphs = KeptSamplerGraphs()
        try:
            import comfy.model_patcher
        except ImportError:
            return
        self.patcher = comfy.model_patcher.ModelPatcher(
            _managed_module(model, low_vram), load_device=common.torch_device(), offload_device=common.offload_device()
        )
        try:
            from comfy.patcher_extension import CallbacksMP
        except ImportError:  # a ComfyUI before patcher callbacks: a failed run still releases the graphs
            return
        self.patcher.add_callback_with_key(CallbacksMP.ON_DETACH, "xportrait_kept_graphs", self._on_detach)

    def _on_detach(self, patcher, unpatch_all: bool) -> None:
        """ComfyUI unloads the networks (`unpatch_all`: the weights leave the device): the kept graphs' addresses
        are stale and their memory is wanted. It also detaches a loaded model without moving it each time a node
        loads it again; the graphs stay then."""
        if unpatch_all:
            self.kept_graphs.release()

    @property
    def config(self):
        return self.model.config

    def ready(self, memory_required: int = 0):
        """The network on the compute device. Inside ComfyUI, `load_models_gpu` moves it there, unloading other
        models first if the GPU is short of memory (the weights plus `memory_required` bytes of working memory),
        and may offload it again when a later node needs the room."""
        from xportrait_core.model.attention import (
            get_attention_backend_setting,
            set_attention_backend,
        )

        # The attention dispatch is process-wide: re-assert this model's choice before every use (only when it
        # differs, since a change drops the dispatch's resolved-backend cache).
        if get_attention_backend_setting() != self.attention:
            set_attention_backend(self.attention)
        if self.patcher is not None:
            import comfy.model_management as mm

            if self.comfy_model is not None:
                from .native.adapter import unload_patched

                # Another handle's LoRA (a KSampler run's) on the shared UNet is not this model's to keep.
                unload_patched(self.model.unet, keep_model=self.patcher.model)
            if self.low_vram:
                from xportrait_core.fast.offload import low_vram_memory_required

                memory_required = low_vram_memory_required(self.model, memory_required)
            # Plain nn.Modules cannot run partially loaded (ComfyUI's low-VRAM mode needs its own layer classes).
            mm.load_models_gpu([self.patcher], memory_required=int(memory_required), force_full_load=True)
            # Under --novram ComfyUI still loads partially: layers left in system memory are cast onto the GPU as
            # they run, so the networks compute on the patcher's device wherever their first weight lies.
            self.model.compute_device = self.patcher.load_device
        else:
            device = common.torch_device()
            if self.model.device != device:
                self.model.to(device)
        from xportrait_core.fast.prepare import prepare_model

        # Low VRAM: the reference net and VAE stay on the CPU and visit the GPU only while they work (the sampler
        # brings them in and out); inside ComfyUI the networks it manages are already in place. Compile: on the
        # compute device, so the attention backend is resolved for it outside the compiled code; the blocks compile
        # lazily, during the first sampling (CUDA only: elsewhere it runs uncompiled, with a note in the log).
        compile_now = self.compile and not self._compiled
        prepare_model(self.model, compile=compile_now, low_vram=self.low_vram,
                      pin_idle=common.pinned_memory_allowed())
        # Here rather than when the pack loads (which must not import torch): every sampling path readies the model
        # before it turns hints into tensors.
        common.apply_pinned_memory_setting()
        if compile_now:
            self._compiled = True
            if self.model.device.type == "cuda":
                log.info("X-Portrait: %s compiled; the first sampling compiles each block shape", self.name)
        return self.model

    def __repr__(self) -> str:
        extras = (", low_vram" if self.low_vram else "") + (", compile" if self.compile else "")
        if self.model.storage_dtype != self.model.dtype:
            extras = f", weights {self.model.storage_dtype}" + extras
        return f"LoadedXPortrait({self.name!r}, dtype={self.model.dtype}, attention={self.attention}{extras})"


def check_model(model, node: str) -> LoadedXPortrait:
    if not isinstance(model, LoadedXPortrait):
        raise ValueError(f"{node}: 'xportrait_model' must come from X-Portrait Load Model, got {type(model).__name__}")
    return model


def _dtype_choices() -> tuple[str, ...]:
    from xportrait_core.model.dtypes import PRECISIONS, STORAGE_PRECISIONS

    # Appended, never reordered: saved workflows store the choice by name.
    return ("auto", *PRECISIONS, *STORAGE_PRECISIONS)


def model_precision(name: str, device, node: str = "X-Portrait Load Model"):
    """(compute dtype, storage dtype or None) of a dtype choice on `device`. auto is the dtype ComfyUI picks for a
    UNet, its --fp16-unet / --bf16-unet / --fp8_e4m3fn-unet / --fp8_e5m2-unet flags included. With an fp8
    choice the diffusion networks' weights are stored in fp8 and the networks compute in what ComfyUI computes
    such weights in (fp16/bf16 on a GPU, float32 on a CPU)."""
    import torch

    from xportrait_core.model.dtypes import STORAGE_PRECISIONS, dtype_named, storage_dtype_named
    from xportrait_core.model.weight_storage import STORAGE_DTYPES

    if name == "auto":
        chosen = common.auto_dtype(device)
    elif name in STORAGE_PRECISIONS:
        chosen = storage_dtype_named(name)
    else:
        chosen = dtype_named(name)
    if chosen.is_floating_point and chosen.itemsize == 1:
        if chosen not in STORAGE_DTYPES:
            raise ValueError(f"{node}: ComfyUI was started with a flag that stores model weights in "
                             f"{str(chosen).replace('torch.', '')}, which X-Portrait's networks cannot run with; "
                             "set dtype to fp8_e4m3fn or fp8_e5m2 (or start ComfyUI without that flag)")
        from .native.operations import comfy_compute_dtype

        compute = comfy_compute_dtype(chosen, device)
        if compute is None:  # outside ComfyUI: as it would choose
            compute = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        return compute, chosen
    return chosen, None


def model_operations(compute_dtype, storage_dtype, device):
    """The operations Load Model builds the networks from: ComfyUI's layer classes inside ComfyUI (its partial
    loading and weight casting then apply to every network), the pack's own elsewhere (with layers that cast their
    weights at every call where they are stored in fp8)."""
    from xportrait_core.fast.operations import fast_operations
    from xportrait_core.model.operations import casting_operations

    from .native.operations import comfy_operations

    operations = comfy_operations(storage_dtype or compute_dtype, device)
    if operations is not None:
        return operations
    return casting_operations(fast_operations()) if storage_dtype is not None else fast_operations()


class LoadXPortraitModel:
    DESCRIPTION = ("Loads the X-Portrait network (UNet with motion modules, appearance reference net, global and "
                   "local motion ControlNets, VAE and, when the file has it, CLIP text encoder) from "
                   "ComfyUI/models/xportrait, for portrait animation (face reenactment). Every key the model needs "
                   "must be in the file with its shape; extra keys (e.g. optimizer or EMA entries) are ignored, "
                   "with a warning shown on the node.")
    CATEGORY = common.CATEGORY
    SEARCH_ALIASES = common.SEARCH_ALIASES
    RETURN_TYPES = (common.MODEL_TYPE, "MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("xportrait_model", "model", "clip", "vae")
    OUTPUT_TOOLTIPS = ("The X-Portrait network, for LoadReference and the Sampler.",
                       "The same network as a ComfyUI MODEL (SD1.5 key names: LoRA loaders apply to its UNet), for "
                       "KSampler / SamplerCustom with X-Portrait Conditioning.",
                       "The checkpoint's CLIP ViT-L text encoder, for CLIP Text Encode (None when the file has none).",
                       "The checkpoint's SD1.5 VAE, for VAE Decode / Encode.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (common.list_model_files(), {
                    "tooltip": "model_state-415001.th or its safetensors conversion, in ComfyUI/models/xportrait "
                               "(or a folder named 'xportrait' in extra_model_paths.yaml)."}),
                "dtype": (list(_dtype_choices()), {
                    "default": "auto",
                    "tooltip": "Weight and compute precision. auto: fp16/bf16 on a GPU that runs them fast, fp32 on "
                               "CPU, or what ComfyUI's --fp8_e4m3fn-unet / --fp8_e5m2-unet flags ask. The official "
                               "inference ran in fp16. fp8_e4m3fn / fp8_e5m2: the UNet, reference net and "
                               "ControlNets hold their weights in fp8 (half the bytes of fp16) and compute in "
                               "fp16/bf16 (fp32 on CPU), casting each layer's weights as it runs: less VRAM, somewhat "
                               "slower, frames close to fp16's but not the same (e4m3fn is the closer). The VAE and "
                               "text encoder keep the compute precision. See the README for measured figures."}),
                "attention": (list(ATTENTION_BACKENDS), {
                    "default": "auto",
                    "tooltip": "auto: xformers when it is installed and works with this torch, else PyTorch SDPA. "
                               "Forcing xformers where it cannot run is an error, not a silent fallback."}),
                "vram": (list(VRAM_MODES), {
                    "default": "normal",
                    "tooltip": "low: the reference net and VAE stay in system memory and visit the GPU only while "
                               "they work (the reference net once per job, for every step at once): a lower memory "
                               "peak, somewhat slower. Same frames. See the README for measured figures."}),
            },
            "optional": {
                "compile": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "torch.compile the networks' repeated blocks (CUDA GPUs). The first sampling takes "
                               "minutes to compile (less once Inductor's cache is warm); later samplings are faster "
                               "(more so with CUDA graphs: start ComfyUI with --disable-cuda-malloc to have them). "
                               "Same frames up to rounding. See the README for measured figures."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model_name=None):
        # A missing checkpoint is the commonest first-run problem: name the file and the folders searched, at
        # queue time, so ComfyUI's dialog says it before anything runs (its own check lists the files it has).
        if model_name is None:
            return True
        return common.missing_model_message(model_name) or True

    def load(self, model_name: str, dtype: str = "auto", attention: str = "auto", vram: str = "normal",
             compile: bool = False, unique_id=None):
        node = "X-Portrait Load Model"
        for name, value, choices in (("dtype", dtype, _dtype_choices()), ("attention", attention, ATTENTION_BACKENDS),
                                     ("vram", vram, VRAM_MODES)):
            if value not in choices:
                raise ValueError(f"{node}: {name} is {value!r}; choose one of {', '.join(choices)}")
        path = common.model_file_path(model_name)

        from xportrait_core.model.attention import (
            get_attention_backend_setting,
            resolve_backend,
            set_attention_backend,
        )
        from xportrait_core.fast.prepare import prepare_model
        from xportrait_core.model.checkpoint import load_xportrait

        compute_device = common.torch_device()
        compute_dtype, storage_dtype = model_precision(dtype, compute_device, node)
        previous = get_attention_backend_setting()
        set_attention_backend(attention)
        try:
            resolve_backend(compute_device, compute_dtype)  # a forced backend that cannot run fails here, by name
        except Exception as exc:
            set_attention_backend(previous)  # leave other models' attention as it was
            raise ValueError(f"{node}: {exc}") from None
        from xportrait_core.model.checkpoint import CheckpointError

        operations = model_operations(compute_dtype, storage_dtype, compute_device)
        warnings: list[str] = []
        try:
            model = load_xportrait(path, dtype=compute_dtype, device=common.offload_device(),
                                   operations=operations, warnings=warnings, storage_dtype=storage_dtype)
        except CheckpointError as exc:
            raise ValueError(f"{node}: {exc}") from None
        except Exception as exc:
            raise ValueError(f"{node}: {os.path.basename(path)} could not be loaded "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})") from exc
        # Channels-last for the GPU it will run on (it is loaded to the offload device first).
        prepare_model(model, channels_last=compute_device.type == "cuda")
        log.info("X-Portrait: loaded %s (%s%s, attention %s)", model_name, compute_dtype,
                 f", weights stored in {storage_dtype}" if storage_dtype is not None else "", attention)
        loaded = LoadedXPortrait(model, model_name, attention, low_vram=vram == "low", compile=bool(compile))
        from .native import comfy_outputs

        comfy_model, clip, vae = comfy_outputs(loaded)
        loaded.comfy_model = comfy_model
        return common.with_report((loaded, comfy_model, clip, vae), [f"Warning: {line}" for line in warnings],
                                  unique_id)


NODE_CLASS_MAPPINGS = {"XPortraitLoadModel": LoadXPortraitModel}
NODE_DISPLAY_NAME_MAPPINGS = {"XPortraitLoadModel": "X-Portrait Load Model"}
