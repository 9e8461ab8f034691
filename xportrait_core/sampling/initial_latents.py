"""The latents sampling starts from (x_T), as the official demo builds them, or pure noise.

Official (`visualize_mm`): the reference is VAE-encoded once per frame (a fresh posterior sample each), scaled, then
noised to t = 999 with `q_sample` and fresh noise. Here the reference is encoded once and its posterior sampled
once per frame, which draws from the same distribution without running the encoder F times. The face-vid2vid
option encodes a given video's frames instead (in chunks) and noises them the same way.

All draws come from `generator` (a CPU torch.Generator: the same seed gives the same latents on every device),
in this order: posterior samples, then the q_sample noise. Results are float32 on the model's device.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..model.xportrait import XPortrait
from ..model.schedule import q_sample

# The official demo noises its starting latents to the last timestep of the chain.
INITIAL_TIMESTEP = 999

REFERENCE = "reference"
NOISE = "noise"
VIDEO = "video"
INITS = (REFERENCE, NOISE, VIDEO)


def _randn(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def _noised(model: XPortrait, latents: torch.Tensor, generator, timestep: int) -> torch.Tensor:
    noise = _randn(latents.shape, generator, latents.device)
    return q_sample(latents, timestep, noise, model.alphas_cumprod)


def _check_images(images: torch.Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must be (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")


@torch.no_grad()
def encode_reference(model: XPortrait, references: torch.Tensor, generator: Optional[torch.Generator] = None,
                     sample: bool = True) -> torch.Tensor:
    """References (R, 3, H, W) in [-1, 1] -> scaled latents (R, 4, H/8, W/8), a posterior sample each (official)."""
    _check_images(references, "references")
    mean, logvar = model.vae.encode(references.to(model.device, model.dtype))
    mean = mean.float()
    if sample:
        mean = mean + torch.exp(0.5 * logvar.float()) * _randn(mean.shape, generator, mean.device)
    return mean * model.config.vae.scale_factor


@torch.no_grad()
def reference_initial_latents(model: XPortrait, reference: torch.Tensor, num_frames: int,
                              generator: Optional[torch.Generator] = None,
                              timestep: int = INITIAL_TIMESTEP) -> torch.Tensor:
    """Official x_T: a posterior sample of the reference per frame, noised to `timestep`. reference (1|3, H, W)."""
    return _noised(model, reference_frame_latents(model, reference, num_frames, generator), generator, timestep)


@torch.no_grad()
def reference_frame_latents(model: XPortrait, reference: torch.Tensor, num_frames: int,
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A posterior sample of the reference per frame, scaled, not noised: the official x_T before its noise (a host
    whose sampler adds the noise itself, as ComfyUI's KSampler does, starts from these)."""
    if reference.ndim == 3:
        reference = reference[None]
    _check_images(reference, "reference")
    if reference.shape[0] != 1:
        raise ValueError(f"the initial latents come from one reference, got {reference.shape[0]}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    mean, logvar = model.vae.encode(reference.to(model.device, model.dtype))
    mean, std = mean.float(), torch.exp(0.5 * logvar.float())
    shape = (num_frames, *mean.shape[1:])
    return (mean + std * _randn(shape, generator, mean.device)) * model.config.vae.scale_factor


@torch.no_grad()
def video_initial_latents(model: XPortrait, frames: torch.Tensor, generator: Optional[torch.Generator] = None,
                          timestep: int = INITIAL_TIMESTEP, chunk: int = 16) -> torch.Tensor:
    """The official face-vid2vid option: frames (F, 3, H, W) in [-1, 1] encoded (posterior samples, `chunk` at a
    time; the frames may stay on the CPU) and noised to `timestep`."""
    _check_images(frames, "initial video frames")
    parts = [model.encode_images(part.to(model.device), generator=generator, sample=True, chunk=chunk)
             for part in frames.split(chunk)]
    return _noised(model, torch.cat(parts).float(), generator, timestep)


def noise_initial_latents(model: XPortrait, num_frames: int, height: int, width: int,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pure Gaussian noise (F, 4, H/8, W/8), the usual text-to-image start."""
    f = model.config.vae.downsample_factor
    shape = (num_frames, model.config.vae.embed_dim, height // f, width // f)
    return _randn(shape, generator, model.device)
