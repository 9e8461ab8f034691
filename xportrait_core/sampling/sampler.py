"""DDIM over overlapping frame windows, as the official `DDIMSampler_ReferenceOnly` samples.

Plain functions in the k-diffusion style: the sampler sees the network only through a `denoise` callable,

    denoise(x_window, t, frame_indices) -> eps_window

with `x_window` (W, C, h, w) float32 latents of the frames `frame_indices` (a CPU int64 tensor of length W) at
timestep `t` (a python int, the same for every frame). Guidance, references and motion hints live in the callable
(see `guidance.py`). Each step draws the windows' start offset, runs `windows.windowed_eps` over that step's
windows (windows.py says how they are laid out) and moves all frames together with one DDIM update.

Randomness (window offsets, eta noise) comes from `generator`, a CPU `torch.Generator` seeded by the caller;
noise is drawn on the CPU and moved, so a seed gives the same draws on every device. The official code draws
offsets with the unseeded python `random.randint(0, F - 1)`; recorded offsets can be replayed with
`window_offsets`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .windows import effective_window, window_indices, windowed_eps, windows_per_step

# Length of the DDPM chain the model was trained on.
NUM_TRAIN_TIMESTEPS = 1000

# The official DDIM discretisation (ldm `make_ddim_timesteps(..., "uniform")`): every (1000 // steps)-th timestep
# from 0, plus one. 30 steps gives 31 timesteps [1, 34, ..., 991]: 1000 // 30 = 33 does not divide 1000.
# The count is therefore not always `steps`; `EVENLY` gives exactly `steps`.
UNIFORM = "uniform"
# Exactly `steps` timesteps spread evenly from 1 to 999, so the first update starts at the noise level of x_T
# (the initial latents are noised to t = 999).
EVENLY = "evenly"
SPACINGS = (UNIFORM, EVENLY)

Denoiser = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


class SamplingCancelled(Exception):
    """Raised by `sample_ddim` when `should_cancel()` returned True; no partial result is kept anywhere."""


def ddim_timesteps(steps: int, spacing: str = UNIFORM, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """DDIM timesteps in increasing order (int64); sampling walks them from last to first."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > num_train_timesteps:
        raise ValueError(f"steps must be at most {num_train_timesteps}, got {steps}")
    if spacing == UNIFORM:
        timesteps = torch.arange(0, num_train_timesteps, num_train_timesteps // steps, dtype=torch.int64) + 1
        # When the stride divides 999 (3, 9, 27, 37, 101-111, 251-333 and 501+ steps) the "+1" reaches 1000, past
        # the end of the chain, and the official code fails; such a last timestep becomes 999.
        return timesteps.clamp(max=num_train_timesteps - 1).unique_consecutive()
    if spacing == EVENLY:
        if steps == 1:
            return torch.tensor([num_train_timesteps - 1], dtype=torch.int64)
        points = torch.linspace(1, num_train_timesteps - 1, steps, dtype=torch.float64)
        return points.round().to(torch.int64)
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")


def ddim_parameters(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, eta: float = 0.0):
    """Per-timestep (alpha, alpha_prev, sigma), float32 CPU tensors aligned with `timesteps` (increasing).

    alpha_prev of the first timestep is alphas_cumprod[0], as in the official `make_ddim_sampling_parameters`.
    """
    alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float32)
    timesteps = torch.as_tensor(timesteps, dtype=torch.int64).cpu()
    alphas = alphas_cumprod[timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    return alphas, alphas_prev, sigmas


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha: float, alpha_prev: float, sigma: float = 0.0,
              noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from x_t with predicted noise eps; returns (x_prev, predicted x_0)."""
    # Filled on the device, not copied there: a copy from host memory would make the host wait for the GPU to
    # drain at every step (the values, and so the results, are the same).
    alpha = torch.full((), alpha, dtype=x.dtype, device=x.device)
    alpha_prev = torch.full((), alpha_prev, dtype=x.dtype, device=x.device)
    sigma = torch.full((), sigma, dtype=x.dtype, device=x.device)
    pred_x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    x_prev = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - sigma ** 2).sqrt() * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def _check_offsets(window_offsets, num_steps: int, num_frames: int) -> list[int]:
    offsets = [int(o) for o in torch.as_tensor(window_offsets, dtype=torch.int64).reshape(-1).tolist()]
    if len(offsets) != num_steps:
        raise ValueError(f"window_offsets has {len(offsets)} entries; need one per step ({num_steps})")
    bad = [o for o in offsets if not 0 <= o < num_frames]
    if bad:
        raise ValueError(f"window offsets must be in [0, {num_frames}), got {bad}")
    return offsets


def _draw_offset(num_frames: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(0, num_frames, (1,), generator=generator).item())


def _draw_noise(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(like.device)


# update(index, x, eps) -> (x at the next, lower timestep, predicted x_0): one step of a sampler, at
# `timesteps[index]`, from the eps averaged over the step's windows.
StepUpdate = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
    *,
    eta: float = 0.0,
    window: int = 16,
    overlap: int = 4,
    window_offsets: torch.Tensor | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """DDIM from x_T (F, C, h, w) over `timesteps` (increasing, as `ddim_timesteps` returns); returns x_0 latents.

    The sampling state is float32 on x_T's device whatever the model's dtype; `denoise` gets float32 windows and
    its eps is cast back to float32.

    window_offsets: one start offset per step (in step order, i.e. from the noisiest timestep), used instead of
        drawing; ignored when the plan draws no offset (F <= window with overlap 0), where it may be empty.
    callback(done, total): after every denoise call; total = steps * windows per step.
    should_cancel(): checked before every denoise call; True raises `SamplingCancelled` after dropping the
        partial latents, so neither the exception nor its traceback keeps them alive.
    on_step(steps_done, num_steps, denoised): after every step, with that step's prediction of x_0 for the whole
        video (float32, like x_T): what a host shows as a preview while sampling goes on.
    """
    timesteps = check_timesteps(timesteps, alphas_cumprod)
    alphas, alphas_prev, sigmas = ddim_parameters(alphas_cumprod, timesteps, eta)

    def ddim_update(index: int, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = float(sigmas[index])
        noise = _draw_noise(x.shape, generator, x) if sigma > 0 else None
        return ddim_step(x, eps, float(alphas[index]), float(alphas_prev[index]), sigma, noise)

    return sample_windowed(denoise, x_T, timesteps, ddim_update, window=window, overlap=overlap,
                           window_offsets=window_offsets, generator=generator, callback=callback,
                           should_cancel=should_cancel, on_step=on_step)


def check_timesteps(timesteps: torch.Tensor | Sequence[int], alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """`timesteps` as a CPU int64 vector, refused unless strictly increasing and inside the schedule."""
    timesteps = torch.as_tensor(timesteps, dtype=torch.int64).cpu().reshape(-1)
    if timesteps.numel() == 0:
        raise ValueError("need at least one timestep")
    if (timesteps[1:] <= timesteps[:-1]).any():
        raise ValueError("timesteps must be strictly increasing (sampling walks them backwards)")
    if timesteps[0] < 0 or timesteps[-1] >= alphas_cumprod.shape[0]:
        raise ValueError(f"timesteps must lie in [0, {alphas_cumprod.shape[0]})")
    return timesteps


def sample_windowed(
    denoise: Denoiser,
    x_T: torch.Tensor,
    timesteps: torch.Tensor,
    update: StepUpdate,
    *,
    window: int = 16,
    overlap: int = 4,
    window_offsets: torch.Tensor | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The loop every sampler shares: walk `timesteps` (checked, increasing) from the last, average eps over the
    step's windows (`windows.windowed_eps`), and let `update` take the step. Arguments as `sample_ddim`; a sampler
    draws its own noise from `generator` inside `update`, after the step's window offset."""
    if x_T.ndim != 4:
        raise ValueError(f"x_T must be (frames, channels, h, w), got {tuple(x_T.shape)}")
    num_frames = x_T.shape[0]
    num_steps = timesteps.numel()
    _, uses_offset = effective_window(num_frames, window, overlap)
    offsets = None
    if window_offsets is not None and uses_offset:
        offsets = _check_offsets(window_offsets, num_steps, num_frames)
    calls_per_step = windows_per_step(num_frames, window, overlap)
    total_calls = num_steps * calls_per_step

    x = x_T.to(torch.float32, copy=True)
    done = 0

    def after_window() -> None:
        nonlocal done
        done += 1
        if callback is not None:
            callback(done, total_calls)

    for step in range(num_steps):
        index = num_steps - 1 - step
        t = int(timesteps[index])
        if uses_offset:
            offset = offsets[step] if offsets is not None else _draw_offset(num_frames, generator)
        else:
            offset = 0
        eps = windowed_eps(denoise, x, t, window_indices(num_frames, window, overlap, offset),
                           should_cancel=should_cancel, after_window=after_window)
        if eps is None:
            # The traceback of the exception holds this frame: drop the partial latents before raising.
            del x
            raise SamplingCancelled(f"sampling cancelled after {done} of {total_calls} model calls")
        x, denoised = update(index, x, eps)
        del eps
        if on_step is not None:
            on_step(step + 1, num_steps, denoised)
        del denoised
    return x
