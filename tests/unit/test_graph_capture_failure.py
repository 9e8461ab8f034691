"""Recording CUDA graphs, CUDA calls stood in on the CPU: a failed recording leaves the CUDA random generators
usable; a recording writes its result into buffers allocated before it."""
from __future__ import annotations

import contextlib
import types

import pytest
import torch

from xportrait_core.fast import cuda_graphs


class _Generator:
    """Stands in for a default CUDA generator: what PyTorch's graph-safe state calls receive."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def clone_state(self):
        self.log.append(("clone", self.name))
        return f"copy of {self.name}"

    def graphsafe_set_state(self, state):
        self.log.append(("set", self.name, state))


def test_a_failed_recording_gives_every_cuda_generator_a_fresh_state(monkeypatch):
    log: list = []
    monkeypatch.setattr(torch.cuda, "default_generators", (_Generator("cuda:0", log), _Generator("cuda:1", log)),
                        raising=False)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None, stream=None: contextlib.nullcontext())
    graphs = types.SimpleNamespace(_pool=None, _stream=None, device=torch.device("cpu"))

    def step():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(cuda_graphs.GraphCaptureError, match="not permitted when stream is capturing"):
        cuda_graphs.GuidanceGraphs._record(graphs, step, cuda_graphs._shape_of(torch.zeros(2)))
    assert log == [("clone", "cuda:0"), ("set", "cuda:0", "copy of cuda:0"),
                   ("clone", "cuda:1"), ("set", "cuda:1", "copy of cuda:1")]


def test_generators_without_graph_safe_states_are_left_alone(monkeypatch):
    monkeypatch.setattr(torch.cuda, "default_generators", (object(),), raising=False)
    cuda_graphs.release_stuck_generators()  # no error: older PyTorch has no clone_state


def test_a_recording_writes_its_result_into_buffers_allocated_before_it(monkeypatch):
    """The graph's output (a window's eps, or a reference bank) lives in storage allocated outside the recording,
    shaped as the eager warm-up's result: under cudaMallocAsync, freeing a recorded allocation after the recording
    draws a PyTorch warning at every run (the GPU test checks the warning is gone)."""
    from xportrait_core.model.reference_bank import ReferenceBank

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    recorded = types.SimpleNamespace(pool=lambda: "the graphs' memory pool")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: recorded)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None, stream=None: contextlib.nullcontext())
    graphs = types.SimpleNamespace(_pool=None, _stream=None, device=torch.device("cpu"))
    record = cuda_graphs.GuidanceGraphs._record

    eps = torch.arange(24.0).reshape(2, 3, 4)
    made = []
    graph, output = record(graphs, lambda: made.append(eps.clone()) or made[-1], cuda_graphs._shape_of(eps))
    assert graph is recorded and graphs._pool == "the graphs' memory pool" and output is not made[0] and torch.equal(output, eps)

    bank = ReferenceBank(1)
    bank.write(0, torch.ones(1, 5, 8))
    bank.write(1, torch.full((1, 2, 16), 2.0, dtype=torch.float16))
    bank.finish()
    warm_up_shape = cuda_graphs._shape_of(bank)
    _, stored = record(graphs, lambda: bank, warm_up_shape)
    assert isinstance(stored, ReferenceBank) and not stored.recording and stored.num_references == 1
    assert [e.dtype for e in stored.entries] == [torch.float32, torch.float16]
    assert all(s is not e and torch.equal(s, e) for s, e in zip(stored.entries, bank.entries))
    with pytest.raises(cuda_graphs.GraphCaptureError, match="3 entries recorded where the warm-up had 2"):
        bank.entries.append(torch.zeros(1))
        record(graphs, lambda: bank, warm_up_shape)
