"""Channels-last memory and torch.compile: ways of running the same networks, never changing what they compute."""
from __future__ import annotations

import weakref

import torch

from ..model import attention
from ..model.blocks import ResBlock, SpatialTransformer
from ..model.temporal import MotionModule
from ..model.vae import AttnBlock, ResnetBlock
from ..model.xportrait import XPortrait
from .operations import probe_kernels

NETWORKS = ("unet", "reference_net", "global_control", "local_control")
RECOMPILE_LIMIT = 128

_compiled: "weakref.WeakSet[XPortrait]" = weakref.WeakSet()


def is_compiled(model: XPortrait) -> bool:
    """Whether `compile_networks` has compiled this model's blocks."""
    return model in _compiled


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
    networks: the same compiled code serves every instance of a block of the same shape, so cold start compiles
    each block shape once rather than each whole network, for most of the fusion gain. The first calls compile.
    The VAE's blocks are compiled the same way: decoding runs once per frame, and its GroupNorm and SiLU passes
    over full-size maps are memory-bound, which fusing them relieves.
    """
    # Resolve (and log) the attention backend and run the kernels' probes eagerly, so compiled graphs only look
    # their answers up.
    attention.resolve_once(model.device, model.dtype)
    probe_kernels(model.device, model.dtype)
    for name in NETWORKS + ("vae",):
        network = getattr(model, name)
        if not regional:
            # The VAE is called through encode/decode, never its forward: compile the halves those call.
            for whole in (network.encoder, network.decoder) if name == "vae" else (network,):
                whole.compile(mode=mode, dynamic=False)
            continue
        compile_blocks(network, mode)
    _compiled.add(model)
    return model


def compile_blocks(network: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """Regional compilation of one network in place: each repeated block (ResBlock, spatial transformer, motion
    module, the VAE's ResnetBlock and AttnBlock) compiled, a graph per input shape; the first calls compile."""
    # Every input shape of a block is its own compiled graph (dynamic=False): the UNet, reference net and
    # ControlNets give a ResBlock dozens of shapes. Past the recompile limit Dynamo silently runs the remaining
    # shapes eagerly, so raise it to cover them all.
    import torch._dynamo  # noqa: PLC0415

    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
    for module in network.modules():
        if isinstance(module, (ResBlock, SpatialTransformer, MotionModule, ResnetBlock, AttnBlock)):
            module.compile(mode=mode, dynamic=False)
    return network
