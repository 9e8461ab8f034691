"""When CUDA graphs serve a sampling run: the device, the switch, the allocator, and the run's length."""
from __future__ import annotations

import types

from xportrait_core.fast import cuda_graphs


def _graphs_possible(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "cuda_graphs_enabled", lambda: True)
    monkeypatch.setattr(cuda_graphs, "allocator_supports_graphs", lambda compiled=False, cuda_malloc_async=True: True)


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


def test_our_sampler_gets_graphs_under_cuda_malloc_async_for_a_long_enough_run(monkeypatch):
    """The pipeline's rules (our Sampler, the CLI) give graphs under ComfyUI's allocator as under the native one,
    for a run long enough to repay the recording; `cuda_malloc_async=False` still keeps a caller eager there."""
    import torch

    from xportrait_core.fast import triton_launch
    from xportrait_core.sampling import pipeline

    monkeypatch.setattr(cuda_graphs, "cuda_graphs_enabled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_launch, "capture_safe", lambda: True)
    for backend in ("cudaMallocAsync", "native"):
        monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", lambda: backend)
        assert cuda_graphs.graphs_apply("cuda", **pipeline.sampler_graph_rules(31))
        assert not cuda_graphs.graphs_apply("cuda", **pipeline.sampler_graph_rules(7))
    monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", lambda: "cudaMallocAsync")
    assert not cuda_graphs.graphs_apply("cuda", steps=30, cuda_malloc_async=False)
