"""A small video's worth of denoiser inputs for the tiny model: latents, one reference, both hints, two texts."""
from __future__ import annotations

import torch


def video_inputs(model, frames: int, seed: int) -> dict:
    """x (frames, 4, h, h), reference (1, 4, h, h), global_hint / local_hint (frames, 3, 8h, 8h) in [-1, 1], and two
    texts, context and uncond_context (1, 77, C), drawn from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    h = model.config.image_size // 8
    width = model.config.unet.context_dim
    return dict(
        x=torch.randn(frames, 4, h, h, generator=g),
        reference=torch.randn(1, 4, h, h, generator=g),
        global_hint=torch.rand(frames, 3, h * 8, h * 8, generator=g) * 2 - 1,
        local_hint=torch.rand(frames, 3, h * 8, h * 8, generator=g) * 2 - 1,
        context=torch.randn(1, 77, width, generator=g),
        uncond_context=torch.randn(1, 77, width, generator=g),
    )
