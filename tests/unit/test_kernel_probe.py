"""probed_once: each kernel's check runs once per (device type, dtype); failures are logged and keep it unused."""
from __future__ import annotations

import torch

from xportrait_core.fast.probe import probed_once


def test_the_check_runs_once_per_device_and_dtype_and_its_answer_is_kept(caplog):
    results, calls = {}, []
    cpu = torch.device("cpu")

    def agrees():
        calls.append(1)
        return True

    assert probed_once(results, "test", "PyTorch", cpu, torch.float16, agrees)
    assert probed_once(results, "test", "PyTorch", cpu, torch.float16, agrees)
    assert probed_once(results, "test", "PyTorch", cpu, torch.bfloat16, agrees)
    assert len(calls) == 2 and not caplog.records


def test_a_disagreeing_or_failing_kernel_is_not_used_and_says_why(caplog):
    results, cpu = {}, torch.device("cpu")

    def fails():
        raise RuntimeError("no C compiler")

    with caplog.at_level("WARNING", logger="xportrait"):
        assert not probed_once(results, "test", "PyTorch", cpu, torch.float16, lambda: False)
        assert not probed_once(results, "test", "PyTorch", cpu, torch.bfloat16, fails)
        assert not probed_once(results, "test", "PyTorch", cpu, torch.bfloat16, fails)  # remembered: no second log
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "test kernel disagrees with PyTorch on cpu/torch.float16" in messages[0]
    assert "test kernel cannot run on cpu/torch.bfloat16 (RuntimeError: no C compiler): using PyTorch" in messages[1]
