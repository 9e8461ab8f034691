"""The ComfyUI types X-Portrait Load Model gives besides its own: MODEL (the adapter), CLIP and VAE.

CLIP and VAE are ComfyUI's own classes, holding copies of the checkpoint's CLIP ViT-L text encoder and SD1.5 VAE
under ComfyUI's key names (`clip_l.*`, LDM `encoder.*` / `decoder.*`), so every core node takes them.
"""
from __future__ import annotations

import torch


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def comfy_vae(xportrait, pack_network: bool = True):
    """comfy.sd.VAE over the checkpoint's VAE (its layout passed explicitly, so smaller test configs work too), its
    network the pack's own (`PackFirstStage`): the same weights and key names as ComfyUI's SD1.5 autoencoder, built
    from the pack's operations over ComfyUI's layer classes (its kernels on CUDA, ComfyUI's partial loading), run
    channels-last on CUDA. ComfyUI keeps deciding its dtype, device, batch sizes and tiling. It stays uncompiled
    with Load Model's `compile` on: with the pack's kernels it decoded faster than compiled (benchmarks/NOTES.md,
    session 24). pack_network=False keeps ComfyUI's own network (the benchmarks' other arm)."""
    import comfy.model_patcher
    import comfy.sd

    from .operations import comfy_operations

    config = xportrait.config.vae
    ddconfig = {"double_z": True, "z_channels": config.z_channels, "resolution": 256,
                "in_channels": config.in_channels, "out_ch": config.out_channels, "ch": config.ch,
                "ch_mult": list(config.ch_mult), "num_res_blocks": config.num_res_blocks, "attn_resolutions": [],
                "dropout": 0.0}
    state = {k: v.detach().to("cpu", torch.float32) for k, v in _prefixed(xportrait.state_dict(), "vae.").items()}
    vae = comfy.sd.VAE(sd=state, config={"params": {"ddconfig": ddconfig, "embed_dim": config.embed_dim}})
    if not pack_network:
        return vae
    network = pack_first_stage(config, comfy_operations(vae.vae_dtype, vae.device))
    network.load_state_dict(state)
    vae.first_stage_model = network.to(vae.vae_dtype)
    vae.patcher = comfy.model_patcher.ModelPatcher(network, load_device=vae.device,
                                                   offload_device=vae.patcher.offload_device)
    return vae


def pack_first_stage(config, operations):
    """The pack's AutoencoderKL with ComfyUI's `first_stage_model` interface."""
    from xportrait_core.model.vae import AutoencoderKL

    class PackFirstStage(AutoencoderKL):
        """encode gives the posterior's mode (ComfyUI's SD1.5 regulariser takes it), decode takes ComfyUI's decode
        options (none apply to SD1.5); inputs on CUDA go channels-last, the layout the pack's kernels and cuDNN's
        convolutions run in without transposing."""

        def encode(self, x, return_reg_log=False):
            mean, _logvar = super().encode(_layout(x))
            return (mean, None) if return_reg_log else mean

        def decode(self, z, **_options):
            return super().decode(_layout(z))

    return PackFirstStage(config, operations).eval().requires_grad_(False)


def _layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def comfy_clip(xportrait):
    """comfy.sd.CLIP (SD1.5's clip_l, final layer as the official conditioning) over the checkpoint's text encoder;
    None when the checkpoint has none. The transformer's size comes from the checkpoint's config (ViT-L/14 for
    the released model)."""
    if xportrait.text_encoder is None:
        return None
    import json
    import os

    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.supported_models_base import ClipTarget

    from xportrait_core.model.checkpoint import ours_to_official

    config = xportrait.config.text_encoder
    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as file:
        clip_config = json.load(file)
    clip_config.update(hidden_size=config.width, intermediate_size=config.intermediate,
                       num_attention_heads=config.heads, num_hidden_layers=config.layers,
                       vocab_size=config.vocab_size, max_position_embeddings=config.max_length,
                       projection_dim=config.width, eos_token_id=config.end_token)
    official = {ours_to_official(f"text_encoder.{k}"): v.detach().to("cpu", torch.float32)
                for k, v in xportrait.text_encoder.state_dict().items()}
    clip_state = comfy.supported_models.SD15({}).process_clip_state_dict(official)
    target = ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    # SD1.5 checkpoints' CLIP (SD1CheckpointClipModel) with the size spelled out: no pooled projection.
    target.params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": clip_config,
                     "return_projected_pooled": False}
    clip = comfy.sd.CLIP(target, tokenizer_data=clip_state)
    missing, _unexpected = clip.load_sd(clip_state, full_model=True)
    # CLIP's projection and logit scale are not part of the text transformer SD1.5 conditions on.
    missing = [k for k in missing if not k.endswith(("text_projection.weight", "logit_scale"))]
    if missing:
        raise ValueError(f"X-Portrait Load Model: the checkpoint's text encoder lacks {', '.join(missing[:8])}")
    return clip
