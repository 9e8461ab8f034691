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


def test_our_sampler_stays_eager_under_cuda_malloc_async_and_keeps_its_batched_banks(monkeypatch):
    """The pipeline (our Sampler, the CLI) asks for graphs with cuda_malloc_async=False: under ComfyUI's allocator
    its eager path, whose reference net runs many timesteps in one call, was the faster one."""
    import torch

    from xportrait_core.fast import triton_launch

    monkeypatch.setattr(cuda_graphs, "cuda_graphs_enabled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_launch, "capture_safe", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", lambda: "cudaMallocAsync")
    assert cuda_graphs.graphs_apply("cuda", steps=30)  # KSampler's adapter
    assert not cuda_graphs.graphs_apply("cuda", steps=30, cuda_malloc_async=False)  # our Sampler
    monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", lambda: "native")
    assert cuda_graphs.graphs_apply("cuda", steps=30, cuda_malloc_async=False)
