"""Hint images kept page-locked between runs (sampling/pinned_hints.py), with page-locking stood in on the CPU."""
import gc
import sys
import types

import numpy as np
import pytest
import torch

from xportrait_core.sampling import pinned_hints
from xportrait_core.sampling.pipeline import hints_to_tensor


@pytest.fixture
def cuda_machine(monkeypatch):
    """torch.cuda.is_available() true, and pin_memory a counted copy (a CPU build cannot page-lock)."""
    pins = []

    def pin_memory(self, *args, **kwargs):
        pins.append(self.nbytes)
        return self.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(pinned_hints, "_kept", {})
    monkeypatch.setattr(pinned_hints, "_allowed", True)
    return pins


def _hint(frames=3, size=8):
    return (np.random.default_rng(0).random((frames, 3, size, size), dtype=np.float32) * 2 - 1)


def test_the_same_hints_are_pinned_once_and_served_to_every_run(cuda_machine):
    hint = _hint()
    first = hints_to_tensor(hint, "global_hint")
    again = hints_to_tensor(hint, "global_hint")
    assert again is first and cuda_machine == [hint.nbytes]
    assert torch.equal(first, torch.from_numpy(hint))
    assert pinned_hints.kept_bytes() == hint.nbytes


def test_the_pinned_copy_leaves_with_its_hints(cuda_machine):
    hint = _hint()
    hints_to_tensor(hint, "global_hint")
    del hint
    gc.collect()
    assert pinned_hints.kept_bytes() == 0 and pinned_hints._kept == {}


def test_hints_changed_in_place_are_pinned_again(cuda_machine):
    hint = torch.from_numpy(_hint())
    first = hints_to_tensor(hint, "global_hint")
    hint.mul_(0.5)
    second = hints_to_tensor(hint, "global_hint")
    assert second is not first and torch.equal(second, hint) and len(cuda_machine) == 2


def test_large_hints_and_cpu_machines_are_left_pageable(cuda_machine, monkeypatch):
    hint = _hint()
    monkeypatch.setattr(pinned_hints, "KEPT_PINNED_BYTES", hint.nbytes - 1)
    assert hints_to_tensor(hint, "global_hint").data_ptr() == hint.ctypes.data  # numpy's memory, not a copy
    monkeypatch.setattr(pinned_hints, "KEPT_PINNED_BYTES", hint.nbytes)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hints_to_tensor(hint, "global_hint").data_ptr() == hint.ctypes.data
    assert cuda_machine == []


def test_no_page_locked_memory_leaves_the_hints_as_they_are(cuda_machine, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    hint = _hint()
    assert hints_to_tensor(hint, "global_hint").data_ptr() == hint.ctypes.data
    assert pinned_hints._kept == {}


def test_comfyui_s_disable_pinned_memory_keeps_hints_pageable_and_drops_kept_copies(cuda_machine, monkeypatch):
    from pack_loader import load_pack

    common = sys.modules[load_pack().__name__ + ".nodes.common"]
    hint = _hint()
    hints_to_tensor(hint, "global_hint")
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_pinned_memory=True)
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    common.apply_pinned_memory_setting()
    assert not pinned_hints.page_locked_allowed() and pinned_hints.kept_bytes() == 0
    assert hints_to_tensor(hint, "global_hint").data_ptr() == hint.ctypes.data
    cli_args.args.disable_pinned_memory = False
    common.apply_pinned_memory_setting()
    assert hints_to_tensor(hint, "global_hint").data_ptr() != hint.ctypes.data
