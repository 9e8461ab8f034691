"""Optional speed-ups that change how the networks run, never what they compute."""
from __future__ import annotations

import torch

from . import attention
from .model import XPortrait

NETWORKS = ("unet", "reference_net", "global_control", "local_control")


def compile_networks(model: XPortrait, mode: str = "default") -> XPortrait:
    """`torch.compile` the four diffusion networks in place (the VAE and text encoder run once per job).

    The first calls after this compile (about a minute per network shape); shapes are static per video
    (window size, resolution), so later windows and steps reuse the compiled graphs.
    """
    # Resolve (and log) the attention backend eagerly, so compiled graphs only look it up.
    attention._resolve_and_log(model.device, model.dtype)
    for name in NETWORKS:
        getattr(model, name).compile(mode=mode, dynamic=False)
    return model
