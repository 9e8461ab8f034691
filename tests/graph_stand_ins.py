"""A stand-in for fast.cuda_graphs.GuidanceGraphs on machines without a GPU, shared by the tests of the graphed
KSampler path (tests/unit/test_video_denoiser.py, tests/unit/test_kept_graphs.py)."""
from __future__ import annotations

import torch


class EagerGraphs:
    """Computes what a replay would (from the tensors a recording would read), eagerly, and counts; `made` lists
    every instance (clear it per test)."""

    made: list = []

    def __init__(self, device, window_eps, compute_bank=None, stored_banks=None):
        self.window_eps, self.compute_bank, self.stored_banks = window_eps, compute_bank, stored_banks
        self.calls, self.released, self.replays, self.forgotten = 0, False, 0, 0
        EagerGraphs.made.append(self)

    @property
    def reads_stored_banks(self) -> bool:
        return self.stored_banks is not None

    def use_stored_banks(self, stored_banks):
        self.stored_banks = stored_banks

    def eps(self, x, t, global_hint=None, local_hint=None):
        self.calls += 1
        timestep = torch.full((1,), int(t), dtype=torch.long)
        bank = self.stored_banks[int(t)] if self.stored_banks is not None else self.compute_bank(timestep)
        return self.window_eps(x, timestep, global_hint, local_hint, bank)

    def forget_bank(self):
        self.forgotten += 1

    def release(self):
        self.released = True
