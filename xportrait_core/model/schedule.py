"""The DDPM noise schedule the model was trained with, and forward noising.

betas are linear in sqrt(beta) from 0.00085 to 0.012 over 1000 steps ("scaled linear"), computed in float64 and
stored as float32 exactly as the official code registers its buffers.
"""
from __future__ import annotations

import torch

from .config import ScheduleConfig


def make_alphas_cumprod(config: ScheduleConfig = ScheduleConfig()) -> torch.Tensor:
    # Always on the CPU: models are built under `torch.device("meta")` when loading, and the schedule must be real.
    sqrt_betas = torch.linspace(config.linear_start ** 0.5, config.linear_end ** 0.5, config.num_timesteps,
                                dtype=torch.float64, device="cpu")
    alphas = 1.0 - sqrt_betas ** 2
    return torch.cumprod(alphas, dim=0).to(torch.float32)


def q_sample(x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise clean latents `x0` to timestep `t`: sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    a_t = alphas_cumprod.to(device=x0.device)[torch.as_tensor(t, device=x0.device, dtype=torch.long)]
    a_t = a_t.reshape(-1, *([1] * (x0.dim() - 1))) if a_t.dim() else a_t
    return (a_t.sqrt() * x0.float() + (1.0 - a_t).sqrt() * noise.float()).to(x0.dtype)
