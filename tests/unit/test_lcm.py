"""The LCM sampler against diffusers' `LCMScheduler` (the reference implementation of LCM multistep sampling) on toy
denoisers: schedule, boundary scalings, every step's update with the same noise, and the windowed path."""
from __future__ import annotations

import os

import pytest
import torch

from xportrait_core.model.schedule import make_alphas_cumprod
from xportrait_core.sampling.lcm import boundary_scalings, lcm_timesteps, sample_lcm
from xportrait_core.sampling.sampler import SamplingCancelled, window_indices

ALPHAS = make_alphas_cumprod()


def _diffusers_lcm():
    """diffusers' LCMScheduler (the `test` extra installs diffusers); missing, it fails under CI, skips locally."""
    try:
        from diffusers import LCMScheduler
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"diffusers is needed for the LCM reference ({exc}); install the 'test' extra")
        pytest.skip(f"diffusers not installed ({exc})")
    # SD1.5's schedule (scaled linear 0.00085..0.012), LCM-LoRA's defaults.
    return LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        original_inference_steps=50, timestep_scaling=10.0, set_alpha_to_one=True)


def toy_denoiser(x: torch.Tensor, t: int, frame_indices: torch.Tensor) -> torch.Tensor:
    """A frame-local, non-linear eps: each frame's prediction depends only on that frame, t and its index, so
    averaging over overlapping windows gives exactly the prediction on the whole video."""
    scale = 0.3 + 0.5 * frame_indices.to(x.dtype).reshape(-1, 1, 1, 1) / 10
    return torch.tanh(x * scale + t / 1000.0) + 0.1 * x.roll(1, dims=-1)


def test_schedule_matches_diffusers_for_every_step_count():
    scheduler = _diffusers_lcm()
    for steps in range(1, 51):
        scheduler.set_timesteps(steps)
        assert lcm_timesteps(steps).tolist() == scheduler.timesteps.flip(0).tolist(), steps
    assert lcm_timesteps(6).tolist() == [179, 339, 499, 679, 839, 999]
    assert lcm_timesteps(4).tolist() == [259, 499, 759, 999]


@pytest.mark.parametrize("steps", [0, 51, 2.0])
def test_bad_step_counts_are_refused(steps):
    with pytest.raises(ValueError, match="steps"):
        lcm_timesteps(steps)


def test_boundary_scalings_match_diffusers():
    scheduler = _diffusers_lcm()
    for t in (0, 1, 19, 179, 999):
        ours = boundary_scalings(t)
        theirs = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert ours == pytest.approx(tuple(float(v) for v in theirs), rel=1e-12, abs=1e-15)
    assert boundary_scalings(0) == (1.0, 0.0)  # at t = 0 the consistency function is the identity


def _diffusers_run(x_T: torch.Tensor, steps: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """diffusers' multistep loop on the whole video with the toy denoiser; its noise from a CPU generator seeded
    like ours (one draw per step but the last, nothing else drawn)."""
    scheduler = _diffusers_lcm()
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    frames = torch.arange(x_T.shape[0])
    x, denoised_per_step = x_T.clone(), []
    for t in scheduler.timesteps:
        eps = toy_denoiser(x, int(t), frames)
        x, denoised = scheduler.step(eps, t, x, generator=generator, return_dict=False)
        denoised_per_step.append(denoised)
    return x, denoised_per_step


@pytest.mark.parametrize("steps", [1, 4, 6, 8])
def test_sampling_matches_diffusers_lcm_scheduler(steps):
    x_T = torch.randn(5, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    expected, expected_denoised = _diffusers_run(x_T, steps, seed=7)
    denoised_seen = []
    ours = sample_lcm(toy_denoiser, x_T, ALPHAS, lcm_timesteps(steps), window=16, overlap=0,
                      generator=torch.Generator().manual_seed(7),
                      on_step=lambda done, total, d: denoised_seen.append(d.clone()))
    # Our schedule is float64-computed then stored float32 (as the official buffers); diffusers' is float32
    # throughout: they differ in the last bits only.
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert len(denoised_seen) == steps
    for mine, theirs in zip(denoised_seen, expected_denoised):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert ours.abs().max() > 0.05 and not torch.equal(ours, x_T)


def test_overlapping_windows_give_the_whole_video_prediction():
    # 20 frames in windows of 8 overlapping by 3, with recorded offsets: the frame-local toy eps averages back to
    # its whole-video value, so the result is diffusers' on the whole video (the generator draws only noise).
    steps = 4
    x_T = torch.randn(20, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    expected, _ = _diffusers_run(x_T, steps, seed=11)
    calls = []

    def denoise(x, t, frames):
        calls.append(frames.tolist())
        return toy_denoiser(x, t, frames)

    ours = sample_lcm(denoise, x_T, ALPHAS, lcm_timesteps(steps), window=8, overlap=3, window_offsets=[0, 5, 13, 19],
                      generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert calls[:4] == [w.tolist() for w in window_indices(20, 8, 3, 0)]
    assert len(calls) == 4 * len(window_indices(20, 8, 3, 0))


def test_same_seed_same_latents_and_progress_and_cancel():
    x_T = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    runs = [sample_lcm(toy_denoiser, x_T, ALPHAS, lcm_timesteps(6), window=4, overlap=1,
                       generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = sample_lcm(toy_denoiser, x_T, ALPHAS, lcm_timesteps(6), window=4, overlap=1,
                       generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(runs[0], other)

    progress = []
    sample_lcm(toy_denoiser, x_T, ALPHAS, lcm_timesteps(3), window=4, overlap=1,
               generator=torch.Generator().manual_seed(5), callback=lambda d, n: progress.append((d, n)))
    assert progress == [(i, 6) for i in range(1, 7)]  # 3 steps x 2 windows (6 frames, window 4, overlap 1)

    with pytest.raises(SamplingCancelled):
        sample_lcm(toy_denoiser, x_T, ALPHAS, lcm_timesteps(3), window=4, overlap=1,
                   generator=torch.Generator().manual_seed(5), should_cancel=lambda: len(progress) > 0)


def test_timesteps_must_increase():
    with pytest.raises(ValueError, match="increasing"):
        sample_lcm(toy_denoiser, torch.zeros(2, 4, 4, 4), ALPHAS, [999, 499], window=16, overlap=0)


def test_pipeline_refuses_unknown_samplers_and_eta_with_lcm():
    from xportrait_core.sampling.pipeline import animate_latents

    with pytest.raises(ValueError, match="sampler must be one of"):
        animate_latents(None, None, sampler="euler")
    with pytest.raises(ValueError, match="eta=0.5 is DDIM's"):
        animate_latents(None, None, sampler="lcm", eta=0.5)
