"""Optional speed-ups that change how the networks run, never what they compute."""
from __future__ import annotations

import torch

from ..model import attention
from ..model.blocks import ResBlock, SpatialTransformer
from ..model.vae import AttnBlock, ResnetBlock
from ..model.xportrait import XPortrait
from ..model.temporal import MotionModule

NETWORKS = ("unet", "reference_net", "global_control", "local_control")
RECOMPILE_LIMIT = 128


def use_channels_last(model: XPortrait) -> XPortrait:
    """Run the networks in channels-last (NHWC) memory: cuDNN's convolutions then need no layout conversion,
    and spatial transformers see their (pixels, channels) tokens without a transpose copy."""
    for name in NETWORKS + ("vae",):
        getattr(model, name).to(memory_format=torch.channels_last)
    model.memory_format = torch.channels_last
    return model


def compile_networks(model: XPortrait, mode: str = "default", regional: bool = True) -> XPortrait:
    """`torch.compile` the diffusion networks and the VAE in place (the text encoder runs once per job).

    regional=True compiles the repeated blocks (ResBlock, spatial transformer, motion module) instead of whole
    networks: the same compiled code serves every instance of a block of the same shape, so cold start takes
    seconds per shape rather than minutes per network, for most of the fusion gain. The first calls compile.
    The VAE's blocks are compiled the same way: decoding runs once per frame, but at 512x512 its GroupNorm+SiLU
    passes over 128-channel full-size maps are memory-bound, and fused they decode 4 frames in 42 ms instead of
    76 ms (H100, bf16), a fifth of a second of a 16-frame video.
    """
    # Resolve (and log) the attention backend eagerly, so compiled graphs only look it up.
    attention._resolve_and_log(model.device, model.dtype)
    # Every input shape of a block is its own compiled graph (dynamic=False): the UNet, reference net and
    # ControlNets give a ResBlock some 30 shapes. Past the recompile limit (8 by default) Dynamo silently runs
    # the remaining shapes eagerly, so raise it to cover them all.
    import torch._dynamo  # noqa: PLC0415

    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
    for name in NETWORKS + ("vae",):
        network = getattr(model, name)
        if not regional:
            # The VAE is called through encode/decode, never its forward: compile the halves those call.
            for whole in (network.encoder, network.decoder) if name == "vae" else (network,):
                whole.compile(mode=mode, dynamic=False)
            continue
        for module in network.modules():
            if isinstance(module, (ResBlock, SpatialTransformer, MotionModule, ResnetBlock, AttnBlock)):
                module.compile(mode=mode, dynamic=False)
    return model
