"""LCM multistep sampling (Luo et al. 2023, "Latent Consistency Models"), for the few-step path with the SD1.5
LCM-LoRA merged into the UNet (4-8 steps, guidance 1-2, as the X-Portrait authors suggest).

At each timestep t, from the window-averaged eps:

    x0       = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
    denoised = c_out(t) x0 + c_skip(t) x            (the consistency model's boundary condition)
    x_prev   = sqrt(a_prev) denoised + sqrt(1 - a_prev) noise      (fresh noise; the last step returns `denoised`)

with c_skip = s^2 / ((10 t)^2 + s^2), c_out = 10 t / sqrt((10 t)^2 + s^2), s = 0.5 (timestep scaling 10 and
sigma_data 0.5, as the LCM distillation and diffusers' `LCMScheduler`). The schedule takes `steps` timesteps, evenly
by index, from the 50-step skipping schedule [19, 39, ..., 999] the LCM was distilled on.

Windows, offsets, progress and cancellation are the DDIM sampler's (`sample_windowed`); noise comes from the same
CPU generator, drawn after each step's window offset, so a seed gives the same frames on every device.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .sampler import NUM_TRAIN_TIMESTEPS, Denoiser, _draw_noise, check_timesteps, sample_windowed

# The LCM was distilled on every (1000 // 50)-th timestep: [19, 39, ..., 999].
ORIGINAL_INFERENCE_STEPS = 50
# The consistency boundary condition's constants (LCM's defaults).
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5
# Defaults of the command line and nodes for LCM: within the 4-8 steps and guidance 1-2 that the X-Portrait
# authors give for the LCM-LoRA.
DEFAULT_LCM_STEPS = 6
DEFAULT_LCM_GUIDANCE = 1.5


def lcm_timesteps(steps: int, original_inference_steps: int = ORIGINAL_INFERENCE_STEPS,
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """LCM timesteps in increasing order (int64), as diffusers' `LCMScheduler.set_timesteps` picks them (which
    returns them decreasing): `steps` indices spread evenly (floored) over the skipping schedule, noisiest first.
    6 steps give [179, 339, 499, 679, 839, 999]."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 1 <= original_inference_steps <= num_train_timesteps:
        raise ValueError(f"original_inference_steps must be in [1, {num_train_timesteps}], "
                         f"got {original_inference_steps}")
    if steps > original_inference_steps:
        raise ValueError(f"LCM takes at most {original_inference_steps} steps (its distillation schedule), "
                         f"got {steps}; LCM is meant for 4-8")
    skip = num_train_timesteps // original_inference_steps
    origin = torch.arange(original_inference_steps, 0, -1, dtype=torch.int64) * skip - 1  # decreasing
    # floor(linspace(0, n, steps, endpoint=False)) in exact integer arithmetic.
    picks = torch.arange(steps, dtype=torch.int64) * original_inference_steps // steps
    return origin[picks].flip(0)


def boundary_scalings(t: int, timestep_scaling: float = TIMESTEP_SCALING,
                      sigma_data: float = SIGMA_DATA) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency boundary condition at discrete timestep t."""
    scaled = t * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def lcm_denoised(x: torch.Tensor, eps: torch.Tensor, t: int, alpha: float) -> torch.Tensor:
    """The consistency function's output at timestep t: c_out x0 + c_skip x, x0 predicted from eps."""
    alpha = torch.full((), alpha, dtype=x.dtype, device=x.device)  # filled there: no wait for the GPU
    pred_x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    c_skip, c_out = boundary_scalings(t)
    return c_out * pred_x0 + c_skip * x


def lcm_renoise(denoised: torch.Tensor, alpha_prev: float, noise: torch.Tensor) -> torch.Tensor:
    """The next step's input: `denoised` noised afresh to the previous (lower) timestep."""
    alpha_prev = torch.full((), alpha_prev, dtype=denoised.dtype, device=denoised.device)
    return alpha_prev.sqrt() * denoised + (1 - alpha_prev).sqrt() * noise


@torch.no_grad()
def sample_lcm(
    denoise: Denoiser,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
    *,
    window: int = 16,
    overlap: int = 4,
    window_offsets: torch.Tensor | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """LCM multistep sampling from x_T (F, C, h, w) over `timesteps` (increasing, as `lcm_timesteps` returns);
    returns the last step's denoised latents. Arguments as `sampler.sample_ddim` (there is no eta: LCM always
    draws fresh noise between steps, one (F, C, h, w) draw from `generator` per step but the last)."""
    timesteps = check_timesteps(timesteps, alphas_cumprod)
    alphas = alphas_cumprod.detach().to("cpu", torch.float32)[timesteps]

    def lcm_update(index: int, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        denoised = lcm_denoised(x, eps, int(timesteps[index]), float(alphas[index]))
        if index == 0:
            return denoised, denoised
        noise = _draw_noise(x.shape, generator, x)
        return lcm_renoise(denoised, float(alphas[index - 1]), noise), denoised

    return sample_windowed(denoise, x_T, timesteps, lcm_update, window=window, overlap=overlap,
                           window_offsets=window_offsets, generator=generator, callback=callback,
                           should_cancel=should_cancel, on_step=on_step)
