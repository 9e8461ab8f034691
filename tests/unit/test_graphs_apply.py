"""When CUDA graphs serve a sampling run: the device, the switch, the allocator, and the run's length."""
from __future__ import annotations

import types

from xportrait_core.fast import cuda_graphs


def _graphs_possible(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "cuda_graphs_enabled", lambda: True)
    monkeypatch.setattr(cuda_graphs, "allocator_supports_graphs", lambda compiled=False: True)


def test_a_run_too_short_to_repay_its_recording_stays_eager(monkeypatch):
    _graphs_possible(monkeypatch)
    short = cuda_graphs.MIN_GRAPHED_STEPS - 1
    assert not cuda_graphs.graphs_apply("cuda", steps=short)
    assert not cuda_graphs.graphs_apply("cuda", steps=6)  # the LCM path's usual length
    assert cuda_graphs.graphs_apply("cuda", steps=cuda_graphs.MIN_GRAPHED_STEPS)
    assert cuda_graphs.graphs_apply("cuda", steps=30)
    assert cuda_graphs.graphs_apply("cuda")  # a caller that does not know the length
    assert not cuda_graphs.graphs_apply("cpu", steps=30)


def test_with_cuda_graphs_wraps_only_a_long_enough_run(monkeypatch):
    _graphs_possible(monkeypatch)
    monkeypatch.setattr(cuda_graphs.compilation, "is_compiled", lambda model: False)
    denoiser = types.SimpleNamespace(needs_cond=True, branches=types.SimpleNamespace(
        model=types.SimpleNamespace(device="cuda")))
    assert cuda_graphs.with_cuda_graphs(denoiser, steps=6) is denoiser
    graphed = cuda_graphs.with_cuda_graphs(denoiser, steps=30)
    assert isinstance(graphed, cuda_graphs.GraphedDenoiser) and graphed.denoiser is denoiser
