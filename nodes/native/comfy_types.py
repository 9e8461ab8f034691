"""The ComfyUI types Load X-Portrait Model gives besides its own: MODEL (the adapter), CLIP and VAE.

CLIP and VAE are ComfyUI's own classes, holding copies of the checkpoint's CLIP ViT-L text encoder and SD1.5 VAE
under ComfyUI's key names (`clip_l.*`, LDM `encoder.*` / `decoder.*`), so every core node takes them.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("xportrait")


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def comfy_vae(xportrait):
    """comfy.sd.VAE over the checkpoint's VAE (its layout passed explicitly, so smaller test configs work too)."""
    import comfy.sd

    vae = xportrait.config.vae
    ddconfig = {"double_z": True, "z_channels": vae.z_channels, "resolution": 256, "in_channels": vae.in_channels,
                "out_ch": vae.out_channels, "ch": vae.ch, "ch_mult": list(vae.ch_mult),
                "num_res_blocks": vae.num_res_blocks, "attn_resolutions": [], "dropout": 0.0}
    state = {k: v.detach().to("cpu", torch.float32) for k, v in _prefixed(xportrait.state_dict(), "vae.").items()}
    return comfy.sd.VAE(sd=state, config={"params": {"ddconfig": ddconfig, "embed_dim": vae.embed_dim}})


def comfy_clip(xportrait):
    """comfy.sd.CLIP (SD1.5's clip_l) over the checkpoint's text encoder; None when the checkpoint has none, or one
    that is not CLIP ViT-L/14 (ComfyUI's SD1 CLIP has that size only)."""
    if xportrait.text_encoder is None:
        return None
    config = xportrait.config.text_encoder
    if (config.width, config.layers, config.heads) != (768, 12, 12):
        log.info("X-Portrait: the checkpoint's text encoder is not CLIP ViT-L/14; no CLIP output")
        return None
    import comfy.sd
    import comfy.supported_models
    from comfy.supported_models_base import ClipTarget
    import comfy.sd1_clip

    from xportrait_core.model.checkpoint import ours_to_official

    official = {ours_to_official(f"text_encoder.{k}"): v.detach().to("cpu", torch.float32)
                for k, v in xportrait.text_encoder.state_dict().items()}
    official["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd15 = comfy.supported_models.SD15({})
    clip_state = sd15.process_clip_state_dict(official)
    clip = comfy.sd.CLIP(ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                         tokenizer_data=clip_state)
    missing, unexpected = clip.load_sd(clip_state, full_model=True)
    missing = [k for k in missing if not k.endswith(("text_projection.weight", "logit_scale"))]
    if missing:
        log.warning("X-Portrait: CLIP keys missing from the checkpoint: %s", ", ".join(missing[:8]))
    return clip
