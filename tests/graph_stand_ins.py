"""A stand-in for fast.cuda_graphs.GuidanceGraphs on machines without a GPU, shared by the tests of the graphed
KSampler path (tests/unit/test_video_denoiser.py, tests/unit/test_kept_graphs.py)."""
from __future__ import annotations

import torch


class EagerGraphs:
    """Computes what a replay would (from the tensors a recording would read), eagerly, and counts; `made` lists
    every instance (clear it per test)."""

    made: list = []

    def __init__(self, device, window_eps, compute_bank=None, stored_banks=None):
        self.window_eps, self.compute_bank = window_eps, compute_bank
        self.calls, self.released, self.replays, self.forgotten = 0, False, 0, 0
        EagerGraphs.made.append(self)

    def eps(self, x, t, global_hint=None, local_hint=None):
        self.calls += 1
        timestep = torch.full((1,), int(t), dtype=torch.long)
        return self.window_eps(x, timestep, global_hint, local_hint, self.compute_bank(timestep))

    def forget_bank(self):
        self.forgotten += 1

    def release(self):
        self.released = True
