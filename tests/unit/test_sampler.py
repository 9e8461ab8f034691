"""The DDIM sampler against fake denoisers: schedule, windows, averaging, determinism, progress, cancellation."""
from __future__ import annotations

import gc

import pytest
import torch

from xportrait_core.sampling.sampler import (
    EVENLY,
    UNIFORM,
    SamplingCancelled,
    ddim_parameters,
    ddim_timesteps,
    sample_ddim,
)
from xportrait_core.sampling.windows import effective_window, window_indices, windowed_eps, windows_per_step
from xportrait_core.model.schedule import make_alphas_cumprod

ALPHAS = make_alphas_cumprod()


# ---------------------------------------------------------------- timesteps


def test_official_uniform_timesteps_hard_values():
    assert ddim_timesteps(4).tolist() == [1, 251, 501, 751]
    t30 = ddim_timesteps(30)
    assert len(t30) == 31  # 1000 // 30 = 33 does not divide 1000: the official schedule has one more timestep
    assert t30[:3].tolist() == [1, 34, 67] and t30[-1].item() == 991
    assert ddim_timesteps(1).tolist() == [1]


@pytest.mark.parametrize("steps", [3, 9, 27, 37, 105, 300, 600, 1000])
def test_uniform_timesteps_never_run_past_the_chain(steps):
    # The official "+1" would give timestep 1000 for these counts (and fail); the last one stays at 999.
    t = ddim_timesteps(steps)
    assert t[-1].item() == 999 and (t[1:] > t[:-1]).all() and t[0].item() == 1
    assert ddim_timesteps(3).tolist() == [1, 334, 667, 999]


def test_uniform_timesteps_match_golden(golden_cases):
    assert torch.equal(ddim_timesteps(4, UNIFORM), golden_cases["ddim4_timesteps"])
    assert torch.equal(ddim_timesteps(30, UNIFORM), golden_cases["ddim30_timesteps"])


def test_evenly_spaced_timesteps():
    t = ddim_timesteps(30, EVENLY)
    assert len(t) == 30 and t[0].item() == 1 and t[-1].item() == 999
    assert (t[1:] > t[:-1]).all()
    assert ddim_timesteps(1, EVENLY).tolist() == [999]


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_bad_step_counts_raise(steps):
    with pytest.raises(ValueError):
        ddim_timesteps(steps)


def test_unknown_spacing_raises():
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(10, "quadratic")


def test_ddim_parameters_first_previous_alpha_is_alphas_cumprod_0():
    t = ddim_timesteps(4)
    a, a_prev, sigma = ddim_parameters(ALPHAS, t, eta=0.0)
    assert torch.equal(a, ALPHAS[[1, 251, 501, 751]])
    assert torch.equal(a_prev, ALPHAS[[0, 1, 251, 501]])
    assert torch.count_nonzero(sigma) == 0
    _, _, sigma1 = ddim_parameters(ALPHAS, t, eta=1.0)
    expected = ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    torch.testing.assert_close(sigma1, expected)


# ---------------------------------------------------------------- DDIM update


def test_oracle_denoiser_lands_on_the_clean_latents():
    """With the exact noise prediction DDIM (eta 0) stays on the line between x0 and the noise it started from."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 3, 3, generator=g)
    noise = torch.randn(6, 4, 3, 3, generator=g)
    a_T = ALPHAS[999]
    x_T = a_T.sqrt() * x0 + (1 - a_T).sqrt() * noise

    def oracle(x, t, idx):
        a = ALPHAS[t]
        return (x - a.sqrt() * x0[idx]) / (1 - a).sqrt()

    # EVENLY starts at t = 999, the noise level of x_T.
    out = sample_ddim(oracle, x_T, ALPHAS, ddim_timesteps(10, EVENLY), window=4, overlap=1,
                      generator=torch.Generator().manual_seed(1))
    a0 = ALPHAS[0]
    torch.testing.assert_close(out, a0.sqrt() * x0 + (1 - a0).sqrt() * noise, atol=1e-5, rtol=1e-5)


def _eps_seen(out: torch.Tensor, t: int) -> torch.Tensor:
    """The eps a single DDIM step from x_t = 0 applied: x_prev is linear in eps with this coefficient."""
    a, a_prev = ALPHAS[t], ALPHAS[0]
    coefficient = (1 - a_prev).sqrt() - (a_prev / a).sqrt() * (1 - a).sqrt()
    return out / coefficient


# ---------------------------------------------------------------- windows


def test_window_layout_matches_the_official_formula():
    # 20 frames, windows of 16 with overlap 4, drawn offset 12: starts 12 and 24 (range(12, 28, 12)), wrapping.
    windows = window_indices(20, 16, 4, offset=12)
    assert [w.tolist() for w in windows] == [
        [12, 13, 14, 15, 16, 17, 18, 19, 0, 1, 2, 3, 4, 5, 6, 7],
        [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    ]
    assert windows_per_step(20, 16, 4) == 2


@pytest.mark.parametrize("frames,window,overlap", [(20, 16, 4), (37, 16, 4), (50, 16, 0), (17, 16, 15), (100, 8, 3)])
def test_windows_cover_every_frame_for_every_offset(frames, window, overlap):
    for offset in range(frames):
        windows = window_indices(frames, window, overlap, offset)
        assert len(windows) == windows_per_step(frames, window, overlap)
        covered = torch.zeros(frames, dtype=torch.long)
        for w in windows:
            assert len(w) == window and len(set(w.tolist())) == window
            covered[w] += 1
        assert (covered >= 1).all()


def test_short_videos_use_one_window_of_all_frames():
    assert effective_window(10, 16, 4) == (10, True)
    assert [w.tolist() for w in window_indices(10, 16, 4, offset=3)] == [[3, 4, 5, 6, 7, 8, 9, 0, 1, 2]]
    assert effective_window(16, 16, 0) == (16, False)
    assert [w.tolist() for w in window_indices(16, 16, 0)] == [list(range(16))]
    assert effective_window(1, 16, 4) == (1, True)


def test_overlap_not_smaller_than_window_raises():
    with pytest.raises(ValueError, match="overlap"):
        window_indices(40, 16, 16, 0)
    with pytest.raises(ValueError):
        sample_ddim(lambda x, t, i: x, torch.zeros(40, 4, 2, 2), ALPHAS, ddim_timesteps(2), window=16, overlap=16)


def test_eps_is_averaged_over_covering_windows():
    calls = []

    def labelled(x, t, idx):
        # Each window predicts (frame index + 100 * its order in the step) for its frames.
        k = len(calls)
        calls.append(idx.tolist())
        return (idx.float() + 100.0 * k).reshape(-1, 1, 1, 1).expand_as(x).clone()

    t = 501
    out = sample_ddim(labelled, torch.zeros(20, 4, 2, 2), ALPHAS, [t], window=16, overlap=4, window_offsets=[12])
    eps = _eps_seen(out, t)[:, 0, 0, 0]
    expected = torch.tensor([
        f + 100.0 * (sum(k for k, w in enumerate(calls) if f in w) / sum(1 for w in calls if f in w))
        for f in range(20)
    ])
    torch.testing.assert_close(eps, expected, atol=1e-3, rtol=1e-5)
    # Frames 0-3 only in the first window, 8-11 only in the second, 4-7 and 12-19 in both.
    assert eps[0].item() == pytest.approx(0.0, abs=1e-3)
    assert eps[9].item() == pytest.approx(109.0, abs=1e-3)
    assert eps[5].item() == pytest.approx(55.0, abs=1e-3)


def test_recorded_offsets_are_used_in_step_order():
    firsts = []

    def recorder(x, t, idx):
        firsts.append((t, idx[0].item()))
        return torch.zeros_like(x)

    sample_ddim(recorder, torch.zeros(20, 4, 2, 2), ALPHAS, ddim_timesteps(4), window=16, overlap=4,
                window_offsets=torch.tensor([12, 12, 6, 19]))
    # Two windows per step; each step's first window starts at its offset, walking the timesteps down.
    assert firsts[0::2] == [(751, 12), (501, 12), (251, 6), (1, 19)]


def test_bad_window_offsets_raise():
    with pytest.raises(ValueError, match="one per step"):
        sample_ddim(lambda x, t, i: x, torch.zeros(20, 4, 2, 2), ALPHAS, ddim_timesteps(4), window_offsets=[1, 2])
    with pytest.raises(ValueError, match="offsets must be in"):
        sample_ddim(lambda x, t, i: x, torch.zeros(20, 4, 2, 2), ALPHAS, ddim_timesteps(2), window_offsets=[1, 20])


def test_single_window_without_overlap_draws_nothing():
    g = torch.Generator().manual_seed(5)
    state = g.get_state().clone()
    seen = []
    sample_ddim(lambda x, t, i: seen.append(i.tolist()) or torch.zeros_like(x), torch.zeros(16, 4, 2, 2), ALPHAS,
                ddim_timesteps(4), window=16, overlap=0, window_offsets=torch.zeros(0, dtype=torch.long), generator=g)
    assert seen == [list(range(16))] * 4
    assert torch.equal(g.get_state(), state)


def test_wrong_eps_shape_raises():
    with pytest.raises(ValueError, match="eps of shape"):
        sample_ddim(lambda x, t, i: x[:1], torch.zeros(8, 4, 2, 2), ALPHAS, ddim_timesteps(2), window=8, overlap=0)


# ---------------------------------------------------------------- determinism, dtype, progress


def _position_dependent(x, t, idx):
    # Depends on the frame's position inside its window, so different offsets give different results.
    pos = torch.arange(len(idx), dtype=x.dtype).reshape(-1, 1, 1, 1)
    return 0.3 * x + 0.05 * pos + 0.001 * t


def _run(seed, eta=0.5):
    x_T = torch.randn(23, 4, 3, 3, generator=torch.Generator().manual_seed(123))
    return sample_ddim(_position_dependent, x_T, ALPHAS, ddim_timesteps(5), eta=eta, window=8, overlap=3,
                       generator=torch.Generator().manual_seed(seed))


def test_same_seed_same_output_different_seed_different_output():
    a, b, c = _run(7), _run(7), _run(8)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    # With eta 0 only the window offsets are random: still seeded.
    assert torch.equal(_run(7, eta=0.0), _run(7, eta=0.0))
    assert (_run(7, eta=0.0) - _run(8, eta=0.0)).abs().max() > 1e-4


def test_state_is_float32_and_input_untouched():
    x_T = torch.randn(5, 4, 2, 2).half()
    before = x_T.clone()
    out = sample_ddim(lambda x, t, i: (0.5 * x).half(), x_T, ALPHAS, ddim_timesteps(3), window=16, overlap=4)
    assert out.dtype == torch.float32 and out.shape == x_T.shape
    assert torch.equal(x_T, before)


def test_callback_reports_every_model_call():
    progress = []
    sample_ddim(lambda x, t, i: torch.zeros_like(x), torch.zeros(20, 4, 2, 2), ALPHAS, ddim_timesteps(4),
                window=16, overlap=4, callback=lambda done, total: progress.append((done, total)))
    assert progress == [(k, 8) for k in range(1, 9)]


def test_on_step_sees_each_steps_prediction_of_x0_and_changes_nothing():
    def denoise(x, t, idx):
        return 0.3 * x + 0.01 * idx.to(x)[:, None, None, None]

    x_T = torch.randn(20, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    seen = []
    kwargs = dict(window=16, overlap=4, generator=None, window_offsets=[3, 7, 11, 15])
    plain = sample_ddim(denoise, x_T, ALPHAS, ddim_timesteps(4), **kwargs)
    watched = sample_ddim(denoise, x_T, ALPHAS, ddim_timesteps(4), **kwargs,
                          on_step=lambda done, steps, x0: seen.append((done, steps, x0.clone())))
    assert torch.equal(plain, watched)
    assert [(d, n) for d, n, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(x0.shape == x_T.shape and x0.dtype == torch.float32 for _, _, x0 in seen)
    # The last step's x_0 prediction is (nearly) the result: alpha_prev of timestep 1 is 0.9991.
    last = seen[-1][2]
    assert float((last - watched).norm() / watched.norm()) < 0.05
    assert float((seen[0][2] - watched).norm() / watched.norm()) > 0.05  # and not from the start


# ---------------------------------------------------------------- cancellation


def _tensors_of_shape(shape):
    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and tuple(o.shape) == shape]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc.get_objects() touches deprecated torch aliases
def test_cancellation_stops_within_one_model_call_and_keeps_nothing():
    shape = (19, 4, 3, 5)  # unusual, so any leftover state tensor can be found by shape
    x_T = torch.randn(shape)
    calls = []

    def denoise(x, t, idx):
        calls.append(t)
        return 0.1 * x

    with pytest.raises(SamplingCancelled) as info:
        sample_ddim(denoise, x_T, ALPHAS, ddim_timesteps(6), window=8, overlap=2,
                    should_cancel=lambda: len(calls) >= 5)
    assert len(calls) == 5  # 3 windows a step: cancelled in the middle of the second step, before call 6
    # Neither the exception's traceback nor anything else holds the partial latents.
    tb = info.value.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            assert not (isinstance(value, torch.Tensor) and tuple(value.shape) == shape and value is not x_T)
        tb = tb.tb_next
    gc.collect()
    leftovers = [o for o in _tensors_of_shape(shape) if o is not x_T]
    assert leftovers == []


# ---------------------------------------------------------------- windowed eps (what a host sampler calls)


def test_windowed_eps_averages_every_window_at_the_timestep_given():
    """A host sampler (ComfyUI's KSampler) asks for the whole video's eps at a timestep of its own, maybe
    fractional: each window's prediction is averaged over the windows covering each frame, t passed through."""
    seen = []

    def by_position(x, t, idx):
        # Each frame's eps is its position inside the window, plus the timestep.
        seen.append((t, idx.tolist()))
        return torch.arange(len(idx), dtype=x.dtype).reshape(-1, 1, 1, 1).expand_as(x) + t

    windows = window_indices(20, 16, 4, offset=12)
    eps = windowed_eps(by_position, torch.zeros(20, 4, 2, 2), 250.5, windows)
    assert [t for t, _ in seen] == [250.5, 250.5]
    positions = [[w.tolist().index(f) for w in windows if f in w.tolist()] for f in range(20)]
    expected = torch.tensor([sum(p) / len(p) for p in positions]) + 250.5
    torch.testing.assert_close(eps[:, 0, 0, 0], expected)
    assert eps[4, 0, 0, 0].item() == pytest.approx((12 + 0) / 2 + 250.5)  # in both windows
    assert eps[0, 0, 0, 0].item() == pytest.approx(8 + 250.5)  # in the first only


def test_windowed_eps_stops_before_the_next_window_when_cancelled():
    calls = []
    out = windowed_eps(lambda x, t, i: calls.append(t) or torch.zeros_like(x), torch.zeros(20, 4, 2, 2), 1,
                       window_indices(20, 16, 4, offset=0), should_cancel=lambda: len(calls) == 1)
    assert out is None and calls == [1]
