"""SD1.5 UNet LoRAs merged into X-Portrait's UNet (e.g. the LCM-LoRA, latent-consistency/lcm-lora-sdv1-5).

Accepted formats (one file may mix spellings; text-encoder keys are ignored, with a note):
  * kohya:            lora_unet_<module with "_">.lora_down.weight / .lora_up.weight / .alpha, the module named
                      the diffusers way (lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q) or
                      the LDM way (lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q); conv LoRAs
                      (4-D down and up, including LoCon's 3x3 down with a 1x1 up) on ResBlocks;
  * peft / diffusers: [unet.]<diffusers module>.lora_A.weight / .lora_B.weight, the older .lora.down.weight /
                      .lora.up.weight and attention-processor ....processor.to_q_lora.down.weight, optional .alpha;
  * LDM-named dotted keys as ComfyUI writes them ([diffusion_model.]input_blocks.1.1....lora_down.weight).

Each LoRA module adds  strength * alpha / rank * (up @ down)  (reshaped to the weight: a conv's kernel folds into
the down matrix) to one weight of the UNet; alpha defaults to the rank. Only the main UNet is changed: the
reference net and the ControlNets keep X-Portrait's trained weights, as ComfyUI's model LoRA loader treats them.

Where LoRA module names meet our parameter names: the diffusers -> LDM block map of SD1.5, derived from the
UNet config (so it holds for the tiny test config as for the official one). Our UNet's parameter names are the
official checkpoint's LDM names (see `checkpoint.py`, the one place where checkpoint key names are mapped).
"""
from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from .config import UNetConfig

log = logging.getLogger("xportrait")

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".pth", ".bin")


class LoraError(ValueError):
    """The file is not a LoRA this UNet can take; the message names the file and says why."""


# ---- the diffusers -> LDM module map of the SD1.5 UNet ---------------------------------------------------------

_RESNET_LAYERS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                  "skip_connection": "conv_shortcut"}
_TOP_LAYERS = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
               "time_embed.2": "time_embedding.linear_2", "out.2": "conv_out"}


def _has_attention(cfg: UNetConfig, level: int) -> bool:
    return 2 ** level in cfg.attention_resolutions


def _inner_block(kind: str, layer: str) -> Optional[str]:
    """A ResBlock's or SpatialTransformer's layer path under its diffusers block (inside a transformer the paths
    are the same in both layouts)."""
    if kind == "resnets":
        return _RESNET_LAYERS.get(layer)
    return layer


def ldm_to_diffusers(module: str, cfg: UNetConfig) -> Optional[str]:
    """The diffusers name of one of our UNet's weight-carrying modules (LDM name, e.g. `input_blocks.1.1.proj_in`
    -> `down_blocks.0.attentions.0.proj_in`); None for modules diffusers' UNet does not have."""
    if module in _TOP_LAYERS:
        return _TOP_LAYERS[module]
    per_level = cfg.num_res_blocks + 1
    levels = len(cfg.channel_mult)
    m = re.fullmatch(r"(input_blocks|output_blocks|middle_block)\.(\d+)(?:\.(\d+))?\.(.+)", module)
    if m is None:
        return None
    group, first, second, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if group == "middle_block":
        # middle_block.<layer>.<rest>: ResBlock, SpatialTransformer, ResBlock.
        layer, rest = first, (second + "." + rest if second is not None else rest)
        kind, index = {0: ("resnets", 0), 1: ("attentions", 0), 2: ("resnets", 1)}.get(layer, (None, None))
        inner = _inner_block(kind, rest) if kind else None
        return f"mid_block.{kind}.{index}.{inner}" if inner else None
    if second is None:
        return None
    block, layer = first, int(second)
    if group == "input_blocks":
        if block == 0:
            return None
        level, j = divmod(block - 1, per_level)
        if level >= levels:
            return None
        if j == cfg.num_res_blocks:  # the level's Downsample
            return f"down_blocks.{level}.downsamplers.0.conv" if layer == 0 and rest == "op" else None
        kind = {0: "resnets", 1: "attentions" if _has_attention(cfg, level) else None}.get(layer)
        inner = _inner_block(kind, rest) if kind else None
        return f"down_blocks.{level}.{kind}.{j}.{inner}" if inner else None
    up, j = divmod(block, per_level)
    if up >= levels:
        return None
    attention = _has_attention(cfg, levels - 1 - up)
    upsample_layer = 2 if attention else 1
    if j == cfg.num_res_blocks and up < levels - 1 and layer == upsample_layer:
        return f"up_blocks.{up}.upsamplers.0.conv" if rest == "conv" else None
    kind = {0: "resnets", 1: "attentions" if attention else None}.get(layer)
    inner = _inner_block(kind, rest) if kind else None
    return f"up_blocks.{up}.{kind}.{j}.{inner}" if inner else None


@functools.lru_cache(maxsize=4)
def unet_weight_shapes(cfg: UNetConfig) -> dict[str, torch.Size]:
    """Every LoRA-able weight of the UNet (linear and conv: 2-D and 4-D), by module name -> weight shape."""
    from .unet import UNet

    with torch.device("meta"):
        unet = UNet(cfg)  # motion modules are not SD1.5's: no SD1.5 LoRA names them
    return {name[: -len(".weight")]: p.shape for name, p in unet.named_parameters()
            if name.endswith(".weight") and p.ndim in (2, 4)}


@functools.lru_cache(maxsize=4)
def lora_module_names(cfg: UNetConfig) -> dict[str, str]:
    """Every spelling of a module name a LoRA file may use -> our module name: LDM and diffusers names, dotted
    and with "_" (kohya). Raises if two modules would share a spelling (the map must be unambiguous)."""
    names: dict[str, str] = {}
    for ours in unet_weight_shapes(cfg):
        spellings = {ours}
        diffusers = ldm_to_diffusers(ours, cfg)
        if diffusers is not None:
            spellings.add(diffusers)
        for spelling in list(spellings):
            spellings.add(spelling.replace(".", "_"))
        for spelling in spellings:
            if names.setdefault(spelling, ours) != ours:
                raise AssertionError(f"LoRA name {spelling!r} is ambiguous: {names[spelling]} and {ours}")
    return names


# ---- reading a LoRA file ----------------------------------------------------------------------------------------

# (key suffix, part); the module name is what precedes the suffix.
_PARTS = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # attention processors: to_q_lora, to_out_lora
    (".alpha", "alpha"),
)
_UNET_PREFIXES = ("lora_unet_", "base_model.model.", "unet.", "model.diffusion_model.", "diffusion_model.")
_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoder(_2)?\.|te\d?\.|lora_te\d?\.|cond_stage_model\.)")


def _split_key(key: str) -> Optional[tuple[str, str]]:
    """(module name as the file spells it, part) of a LoRA key; None for keys of no known part."""
    for suffix, part in _PARTS:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _normalise(module: str) -> str:
    # Attention-processor LoRAs name `attn1.processor.to_q` and `attn1.processor.to_out`.
    if ".processor." in module:
        module = module.replace(".processor.", ".")
        if module.endswith("to_out"):
            module += ".0"
    return module


def _strip_prefixes(module: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _UNET_PREFIXES:
            if module.startswith(prefix):
                module, changed = module[len(prefix):], True
    return module


def read_lora_file(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file on the CPU: safetensors, or a torch file read with weights_only (never
    unpickling code)."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise LoraError(f"{path.name}: not a LoRA file (expected one of {', '.join(LORA_SUFFIXES)})")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message for a pickled object suggests loading it with code: name only the object.
        needs_code = re.search(r"Unsupported global: GLOBAL [\w.]+", str(exc))
        detail = needs_code.group(0) if needs_code else f"{type(exc).__name__}: {exc}"
        raise LoraError(f"{path.name}: cannot be read as a safetensors or weights-only torch file ({detail}); "
                        "files that need code to unpickle are refused") from exc
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoraError(f"{path.name}: does not hold a state dict of tensors")
    return data


# ---- LoRA -> weight deltas ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraFactors:
    """One weight's LoRA: its change at strength 1 is scale * (up @ down), reshaped to the weight."""

    up: torch.Tensor  # (out, rank)
    down: torch.Tensor  # (rank, in * kernel)
    scale: float  # alpha / rank
    shape: torch.Size  # the weight's

    def delta(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        up, down = self.up.to(device=device, dtype=dtype), self.down.to(device=device, dtype=dtype)
        return (up @ down).reshape(self.shape) * self.scale


@dataclass
class UNetLora:
    """A LoRA file as low-rank changes to UNet weights, `factors[param name]`, where the parameter names are the
    UNet's own (`input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`). `file_modules` gives, for each
    module name as the file spells it (the key before `.lora_down.weight` etc.), the parameter it changes."""

    name: str
    factors: dict[str, LoraFactors]
    file_modules: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    text_encoder_keys: int = 0

    def delta(self, key: str) -> torch.Tensor:
        """The change of parameter `key` at strength 1 (float32, CPU)."""
        return self.factors[key].delta()


def unet_lora(state: dict[str, torch.Tensor], cfg: UNetConfig, name: str = "LoRA") -> UNetLora:
    """What a LoRA state dict changes in a UNet of config `cfg`; refuses one that matches nothing or whose
    matrices do not fit the weights they name. Unmatched keys are listed (see `warn_unmatched`)."""
    names = lora_module_names(cfg)
    shapes = unet_weight_shapes(cfg)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    file_modules: dict[str, str] = {}
    unmatched, text_keys = [], 0
    for key, value in state.items():
        if _TEXT_ENCODER.match(key):
            text_keys += 1
            continue
        split = _split_key(key)
        module = names.get(_strip_prefixes(_normalise(split[0]))) if split else None
        if module is None:
            unmatched.append(key)
            continue
        if split[1] in parts.setdefault(module, {}):
            raise LoraError(f"{name}: two keys give the same LoRA matrix of {module} ({split[1]}), e.g. {key}")
        parts[module][split[1]] = value
        file_modules.setdefault(split[0], module)
    first_key = {module: prefix for prefix, module in reversed(list(file_modules.items()))}
    factors = {}
    for module, found in parts.items():
        if "down" not in found or "up" not in found:
            missing = "up" if "down" in found else "down"
            raise LoraError(f"{name}: the LoRA of {first_key[module]} has no {missing} matrix: the file is "
                            "incomplete or in a format this loader does not know")
        down, up = found["down"].float(), found["up"].float()
        rank = down.shape[0]
        shape = shapes[module]
        if up.ndim < 2 or up.shape[0] != shape[0] or up.flatten(1).shape[1] != rank or \
                down.flatten(1).shape[1] * shape[0] != shape.numel():
            raise LoraError(f"{name}: its LoRA for {first_key[module]} has matrices {tuple(up.shape)} @ "
                            f"{tuple(down.shape)}, which do not fit the UNet weight {tuple(shape)}: "
                            "an SD1.5 LoRA is needed (SDXL and SD2 LoRAs do not fit)")
        alpha = float(found["alpha"]) if "alpha" in found else float(rank)
        factors[module + ".weight"] = LoraFactors(up.flatten(1), down.flatten(1), alpha / rank, shape)
    if not factors:
        example = f" (e.g. {unmatched[0]})" if unmatched else ""
        only_text = " it holds only text-encoder keys;" if text_keys and not unmatched else ""
        raise LoraError(f"{name}: not an SD1.5 UNet LoRA:{only_text} none of its {len(state)} keys names a weight "
                        f"of the X-Portrait UNet{example}")
    file_modules = {prefix: module + ".weight" for prefix, module in file_modules.items()}
    return UNetLora(name, factors, file_modules, unmatched, text_keys)


def load_unet_lora(path: Union[str, os.PathLike], cfg: UNetConfig) -> UNetLora:
    """`unet_lora` of a file, with its unmatched and text-encoder keys reported in the log."""
    path = Path(path)
    lora = unet_lora(read_lora_file(path), cfg, path.name)
    warn_unmatched(lora)
    return lora


def warn_unmatched(lora: UNetLora) -> None:
    if lora.unmatched:
        log.warning("%s: %d LoRA keys match no weight of the X-Portrait UNet and are ignored (e.g. %s)",
                    lora.name, len(lora.unmatched), lora.unmatched[0])
    if lora.text_encoder_keys:
        log.info("%s: its %d text-encoder keys are ignored (X-Portrait's text encoder only encodes the prompt "
                 "its UNet was trained with)", lora.name, lora.text_encoder_keys)


@torch.no_grad()
def merge_unet_lora(unet: torch.nn.Module, lora: UNetLora, strength: float = 1.0) -> None:
    """Add `strength` x the LoRA's deltas to the UNet's weights, in place (computed in float32, stored in the
    weights' dtype). Strength 0 leaves every weight untouched."""
    if strength == 0:
        return
    params = dict(unet.named_parameters())
    for key, factors in lora.factors.items():
        weight = params[key]
        # One weight's float32 change at a time: never a second UNet's worth of memory.
        merged = weight.float() + float(strength) * factors.delta(device=weight.device)
        weight.copy_(merged.to(weight.dtype))


def merge_lora_file(unet: torch.nn.Module, path: Union[str, os.PathLike], strength: float = 1.0) -> UNetLora:
    """Read a LoRA file and merge it into `unet` (an X-Portrait UNet) in place; returns what was merged."""
    lora = load_unet_lora(path, unet.config)
    merge_unet_lora(unet, lora, strength)
    log.info("merged %s into the UNet at strength %g (%d weights)", lora.name, strength, len(lora.factors))
    return lora


def with_merged_unet(model, lora: UNetLora, strength: float = 1.0):
    """A new X-Portrait model whose UNet is a copy of `model`'s with the LoRA merged; every other network (reference
    net, ControlNets, VAE, text encoder) is shared with `model`, which is left unchanged."""
    import copy

    merged = copy.copy(model)
    # nn.Module keeps its children in dicts that a shallow copy would share: give the copy its own.
    merged._modules = dict(model._modules)
    merged._parameters = dict(model._parameters)
    merged._buffers = dict(model._buffers)
    merged.unet = copy.deepcopy(model.unet)
    merge_unet_lora(merged.unet, lora, strength)
    return merged
