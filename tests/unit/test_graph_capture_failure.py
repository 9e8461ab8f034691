"""A failed CUDA graph recording leaves the CUDA random generators usable (CPU: CUDA calls are stand-ins)."""
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
    graphs = types.SimpleNamespace(_pool=None, _stream=None)

    def step():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(cuda_graphs.GraphCaptureError, match="not permitted when stream is capturing"):
        cuda_graphs.GuidanceGraphs._record(graphs, step)
    assert log == [("clone", "cuda:0"), ("set", "cuda:0", "copy of cuda:0"),
                   ("clone", "cuda:1"), ("set", "cuda:1", "copy of cuda:1")]


def test_generators_without_graph_safe_states_are_left_alone(monkeypatch):
    monkeypatch.setattr(torch.cuda, "default_generators", (object(),), raising=False)
    cuda_graphs.release_stuck_generators()  # no error: older PyTorch has no clone_state
