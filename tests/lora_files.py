"""Test LoRA files for an X-Portrait UNet, in the formats people find them in, with the weight changes they must make.

    expected = write_kohya_lora(path, unet, rank=4, alpha=2.0, seed=0)
    expected = write_diffusers_lora(path, unet, rank=4, alpha=None, seed=0, style="peft")

Each writer covers every linear and conv weight of the UNet (attention projections, feed-forward, proj_in/out,
ResBlock convs incl. 3x3 LoCon-style convs with a 1x1 up, time embedding, skip convs, down- and upsamplers, conv_in
and conv_out) and returns the expected change of each weight at strength 1, keyed by the UNet's parameter names
(`input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`): alpha / rank * (up @ down), reshaped to the weight, in
float32. A LoRA at strength s changes a weight by s x that. The module names are written the diffusers way through
`ldm_to_diffusers`, whose map tests/unit/test_lora.py proves against diffusers' own SD1.5 UNet.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from xportrait_core.model.lora import ldm_to_diffusers


def _weights(unet) -> dict[str, torch.Size]:
    """The UNet's linear and conv weights outside the motion modules (which no SD1.5 LoRA names)."""
    return {name[: -len(".weight")]: p.shape for name, p in unet.named_parameters()
            if name.endswith(".weight") and p.ndim in (2, 4) and "motion_modules" not in name}


def _matrices(shape: torch.Size, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a weight: linear (r, in) / (out, r); conv (r, in, k, k) / (out, r, 1, 1), as kohya's LoCon."""
    down_shape = (rank, *shape[1:])
    up_shape = (shape[0], rank) + ((1, 1) if len(shape) == 4 else ())
    down = torch.randn(down_shape, generator=generator) * 0.1
    up = torch.randn(up_shape, generator=generator) * 0.1
    return down, up


def _expected(down: torch.Tensor, up: torch.Tensor, shape: torch.Size, alpha: Optional[float]) -> torch.Tensor:
    rank = down.shape[0]
    scale = (alpha if alpha is not None else rank) / rank
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale


def write_kohya_lora(path, unet, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                     text_encoder_keys: bool = True) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA (`lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`) for every
    UNet weight: diffusers-style names for even modules, LDM-style names for odd ones (kohya writes both); plus a
    few text-encoder keys (`lora_te_...`) that the loader must ignore. Returns the expected deltas."""
    generator = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for i, (module, shape) in enumerate(sorted(_weights(unet).items())):
        name = ldm_to_diffusers(module, unet.config) if i % 2 == 0 else module
        key = "lora_unet_" + name.replace(".", "_")
        down, up = _matrices(shape, rank, generator)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
        expected[module + ".weight"] = _expected(down, up, shape, alpha)
    if text_encoder_keys:
        te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        tensors[f"{te}.lora_down.weight"] = torch.randn(rank, 8, generator=generator)
        tensors[f"{te}.lora_up.weight"] = torch.randn(8, rank, generator=generator)
        tensors[f"{te}.alpha"] = torch.tensor(float(alpha))
    _save(tensors, path)
    return expected


def write_diffusers_lora(path, unet, rank: int = 4, alpha: Optional[float] = None, seed: int = 0,
                         style: str = "peft") -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA for every UNet weight: style "peft" (`unet.<module>.lora_A.weight` / `lora_B`) or
    "old" (`unet.<module>.lora.down.weight` / `lora.up.weight`); `.alpha` keys only when alpha is given (peft
    files keep alpha in their adapter config, so the loader's default, alpha = rank, applies). Returns the
    expected deltas."""
    if style not in ("peft", "old"):
        raise ValueError(f"style must be 'peft' or 'old', got {style!r}")
    down_name, up_name = ("lora_A.weight", "lora_B.weight") if style == "peft" else ("lora.down.weight", "lora.up.weight")
    generator = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for module, shape in sorted(_weights(unet).items()):
        key = "unet." + ldm_to_diffusers(module, unet.config)
        down, up = _matrices(shape, rank, generator)
        tensors[f"{key}.{down_name}"] = down
        tensors[f"{key}.{up_name}"] = up
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
        expected[module + ".weight"] = _expected(down, up, shape, alpha)
    _save(tensors, path)
    return expected


def _save(tensors: dict[str, torch.Tensor], path) -> None:
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, str(path))
