"""windowed_eps under a spread (windows.spreading_windows), with a stand-in for the other processes: each rank's
share, the combined sums, progress for every window, and a rank without windows, all without torch.distributed."""
from __future__ import annotations

import torch

from xportrait_core.model.schedule import make_alphas_cumprod
from xportrait_core.sampling.distributed import window_share
from xportrait_core.sampling.sampler import ddim_timesteps, sample_ddim
from xportrait_core.sampling.windows import spreading_windows, window_indices, window_sums, windowed_eps


def _denoise(x, t, frame_indices):
    # Depends on the frame, its position in the window and t, so a wrong sum or count shows.
    position = torch.arange(len(frame_indices), dtype=torch.float32).reshape(-1, 1, 1, 1)
    return 0.1 * x + 0.01 * position + 1e-4 * t + 0.001 * frame_indices.float().reshape(-1, 1, 1, 1)


def _both(x, t, frame_indices):
    eps = _denoise(x, t, frame_indices)
    return eps, 2 * eps


class OtherRanksHere:
    """Rank `rank` of `world_size`; `combine` computes the other ranks' sums itself, as the all-reduce would add."""

    def __init__(self, rank, world_size, denoise):
        self.rank, self.world_size, self.denoise, self.combined = rank, world_size, denoise, 0

    def share(self, windows):
        mine = window_share(len(windows), self.world_size, self.rank)
        self._windows = windows
        return windows[mine.start:mine.stop]

    def combine(self, totals, returns_tuple, x, num_windows):
        self.combined += 1
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            share = window_share(num_windows, self.world_size, rank)
            others, tuple_there = window_sums(self.denoise, x, self._t, self._windows[share.start:share.stop])
            if others is None:
                continue
            if totals is None:
                totals, returns_tuple = others, tuple_there
            else:
                totals.buffer += others.buffer
        return totals, returns_tuple

    def same_everywhere(self, tensor):
        return tensor


def test_each_rank_gets_the_single_process_average_and_counts_every_window():
    x = torch.randn(20, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    windows = window_indices(20, 6, 2, offset=7)
    assert len(windows) == 5
    expected = windowed_eps(_denoise, x, 500, windows)
    expected_both = windowed_eps(_both, x, 500, windows)
    for world_size in (2, 3, 6):  # 6 ranks: one of them has no window
        for rank in range(world_size):
            spread = OtherRanksHere(rank, world_size, _denoise)
            spread._t = 500
            progress = []
            with spreading_windows(spread):
                got = windowed_eps(_denoise, x, 500, windows, after_window=lambda: progress.append(1))
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            assert len(progress) == len(windows) and spread.combined == 1
            spread = OtherRanksHere(rank, world_size, _both)
            spread._t = 500
            with spreading_windows(spread):
                got = windowed_eps(_both, x, 500, windows)
            assert isinstance(got, tuple) and len(got) == 2
            for a, b in zip(got, expected_both):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_the_spread_ends_with_its_block():
    calls = []

    class Counting(OtherRanksHere):
        def share(self, windows):
            calls.append(len(windows))
            return super().share(windows)

    x = torch.zeros(8, 4, 2, 2)
    spread = Counting(0, 2, _denoise)
    spread._t = 1
    with spreading_windows(spread):
        windowed_eps(_denoise, x, 1, window_indices(8, 4, 1, 0))
    windowed_eps(_denoise, x, 1, window_indices(8, 4, 1, 0))
    assert calls == [3]


def test_sample_ddim_progress_counts_every_window_of_every_step_on_a_rank():
    x_T = torch.randn(20, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    timesteps = ddim_timesteps(3)
    single = sample_ddim(_denoise, x_T, make_alphas_cumprod(), timesteps, window=6, overlap=2,
                         generator=torch.Generator().manual_seed(5))

    spread = OtherRanksHere(1, 3, _denoise)  # 5 windows a step: rank 1 runs 2, the others 2 and 1
    seen = []

    def denoise(x, t, frame_indices):
        spread._t = t
        return _denoise(x, t, frame_indices)

    with spreading_windows(spread):
        spread._t = int(timesteps[-1])
        got = sample_ddim(denoise, x_T, make_alphas_cumprod(), timesteps, window=6, overlap=2,
                          generator=torch.Generator().manual_seed(5), callback=lambda d, n: seen.append((d, n)))
    torch.testing.assert_close(got, single, rtol=0, atol=1e-5)
    calls = len(timesteps) * 5
    assert seen == [(done, calls) for done in range(1, calls + 1)] and spread.combined == len(timesteps)


def test_the_lcm_sampler_is_spread_too():
    # It shares the window loop (sampler.sample_windowed -> windowed_eps), so the spread reaches it unchanged.
    from xportrait_core.sampling.lcm import lcm_timesteps, sample_lcm

    x_T = torch.randn(20, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    timesteps = lcm_timesteps(4)
    single = sample_lcm(_denoise, x_T, make_alphas_cumprod(), timesteps, window=6, overlap=2,
                        generator=torch.Generator().manual_seed(5))
    spread = OtherRanksHere(2, 3, _denoise)  # 5 windows a step: rank 2 runs the last one

    def denoise(x, t, frame_indices):
        spread._t = t
        return _denoise(x, t, frame_indices)

    with spreading_windows(spread):
        got = sample_lcm(denoise, x_T, make_alphas_cumprod(), timesteps, window=6, overlap=2,
                         generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, single, rtol=0, atol=1e-5)
    assert spread.combined == len(timesteps) and not torch.equal(got, x_T)
