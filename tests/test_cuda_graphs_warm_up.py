"""When GuidanceGraphs records: after an eager warm-up call, or at once where an earlier run of the same computation
warmed it up, and eagerly again where such a recording fails. Run on the CPU: CUDA streams are stand-ins, and a
"recording" keeps the function to call again at each replay, writing into the recorded output as a graph would."""
from __future__ import annotations

import contextlib
import types

import pytest
import torch

from xportrait_core import cuda_graphs
from xportrait_core.reference_attention import ReferenceBank


class _Stream:
    def wait_stream(self, other):
        pass


class _Replayable:
    def __init__(self, fn, output):
        self.fn, self.output = fn, output

    def replay(self):
        fresh = self.fn()
        if isinstance(self.output, ReferenceBank):
            for kept, new in zip(self.output.entries, fresh.entries):
                kept.copy_(new)
        else:
            self.output.copy_(fresh)


@pytest.fixture
def graph_log(monkeypatch):
    """Stand-ins for the CUDA calls GuidanceGraphs makes. `graph_log.recorded` lists the recordings in order;
    recording fails while `graph_log.failing` is set."""
    log = types.SimpleNamespace(recorded=[], failing=False)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def record(self, fn):
        if log.failing:
            raise cuda_graphs.GraphCaptureError("RuntimeError: operation not permitted when stream is capturing")
        output = fn()
        log.recorded.append("recorded")
        return _Replayable(fn, output), output

    monkeypatch.setattr(cuda_graphs.GuidanceGraphs, "_record", record)
    monkeypatch.setattr(cuda_graphs._Recorded, "replay", lambda self, values: (
        [self.inputs[k].copy_(v) for k, v in values.items()], self.graph.replay(), self.output)[-1])
    return log


def _computation():
    """A bank from the timestep and an eps from the window and the bank."""

    def compute_bank(t):
        bank = ReferenceBank()
        bank.write(0, torch.full((1, 2, 3), float(t.item())))
        return bank.finish()

    def guided_eps(x, t, global_hint, local_hint, bank):
        return x * 2 + bank.entries[0].sum() + global_hint.sum()

    return compute_bank, guided_eps


def _run(warmed, steps=(501, 251, 1), windows=2):
    compute_bank, guided_eps = _computation()
    graphs = cuda_graphs.GuidanceGraphs(torch.device("cpu"), guided_eps, compute_bank=compute_bank, warmed=warmed)
    x, hint = torch.arange(6.0).view(2, 3), torch.ones(2, 3)
    outs = [graphs.eps(x + w, t, hint) for t in steps for w in range(windows)]
    replays = graphs.replays
    graphs.release()
    return outs, replays


def _expected(steps=(501, 251, 1), windows=2):
    x, hint = torch.arange(6.0).view(2, 3), torch.ones(2, 3)
    return [(x + w) * 2 + 6 * t + hint.sum() for t in steps for w in range(windows)]


def test_a_first_run_records_after_one_eager_call_and_a_second_run_records_at_once(graph_log):
    warmed: set = set()
    first, replays = _run(warmed)
    for out, want in zip(first, _expected()):
        torch.testing.assert_close(out, want)
    # Step 1 eagerly (its second window too: the bank it read was eager), then recorded at step 2.
    assert replays == 4 and graph_log.recorded == ["recorded", "recorded"]
    assert warmed == {"bank", (("x", (2, 3), torch.float32), ("global_hint", (2, 3), torch.float32))}
    graph_log.recorded.clear()
    second, replays = _run(warmed)
    for out, want in zip(second, _expected()):
        torch.testing.assert_close(out, want)
    # All six windows replayed: the bank and the window were recorded on the first call.
    assert replays == 6 and graph_log.recorded == ["recorded", "recorded"]


def test_a_stale_warm_up_runs_that_call_eagerly_and_records_the_next(graph_log):
    warmed: set = set()
    _run(warmed)
    graph_log.recorded.clear()
    graph_log.failing = True  # the networks were recompiled since, say: recording fails once
    compute_bank, guided_eps = _computation()
    graphs = cuda_graphs.GuidanceGraphs(torch.device("cpu"), guided_eps, compute_bank=compute_bank, warmed=warmed)
    x, hint = torch.arange(6.0).view(2, 3), torch.ones(2, 3)
    first = graphs.eps(x, 501, hint)
    # Both ran eagerly, so both count as this run's own warm-up now.
    assert graph_log.recorded == [] and graphs._warmed_here == warmed and len(warmed) == 2
    graph_log.failing = False
    outs = [first] + [graphs.eps(x, t, hint) for t in (251, 1)]
    for out, want in zip(outs, _expected(windows=1)):
        torch.testing.assert_close(out, want)
    # Call 1 eagerly (the failed bank recording sent it there), recorded at call 2 as on a first run.
    assert graph_log.recorded == ["recorded", "recorded"] and graphs.replays == 2


def test_a_recording_that_fails_after_its_own_warm_up_still_raises(graph_log):
    compute_bank, guided_eps = _computation()
    graphs = cuda_graphs.GuidanceGraphs(torch.device("cpu"), guided_eps, compute_bank=compute_bank, warmed=set())
    x, hint = torch.arange(6.0).view(2, 3), torch.ones(2, 3)
    graphs.eps(x, 501, hint)
    graph_log.failing = True
    with pytest.raises(cuda_graphs.GraphCaptureError):
        graphs.eps(x, 251, hint)
