"""What the entry points (CLI, Load node, benchmarks) share: the precision names and the one prepare function."""
from __future__ import annotations

import logging

import pytest
import torch

from xportrait_core.fast import compilation, offload
from xportrait_core.fast.prepare import prepare_model
from xportrait_core.model.config import XPortraitConfig
from xportrait_core.model.dtypes import PRECISIONS, dtype_named
from xportrait_core.model.xportrait import XPortrait


def test_precision_names_map_to_torch_dtypes_and_unknown_ones_are_refused():
    assert list(PRECISIONS) == ["fp16", "bf16", "fp32"]
    assert [dtype_named(name) for name in PRECISIONS] == [torch.float16, torch.bfloat16, torch.float32]
    with pytest.raises(ValueError, match="unknown precision 'fp8': expected one of fp16, bf16, fp32"):
        dtype_named("fp8")


@pytest.fixture
def model():
    return XPortrait(XPortraitConfig.tiny(), with_text_encoder=False)


def test_prepare_runs_the_steps_asked_for_in_order(model, monkeypatch):
    steps = []
    monkeypatch.setattr(model.__class__, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(compilation, "use_channels_last", lambda m: steps.append("channels_last") or m)
    monkeypatch.setattr(compilation, "compile_networks",
                        lambda m, mode, regional: steps.append(("compile", mode, regional)) or m)
    monkeypatch.setattr(offload, "place_for_low_vram",
                        lambda m, device, pin_idle: steps.append(("low_vram", device.type, pin_idle)) or m)
    assert prepare_model(model) is model and steps == []
    prepare_model(model, channels_last=True, compile=True, compile_mode="max-autotune-no-cudagraphs",
                  regional=False, low_vram=True, pin_idle=False)
    assert steps == ["channels_last", ("compile", "max-autotune-no-cudagraphs", False), ("low_vram", "cuda", False)]


def test_prepare_puts_the_networks_in_channels_last_memory(model):
    prepare_model(model, channels_last=True)
    assert model.memory_format == torch.channels_last
    conv = model.unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_prepare_compiles_on_cuda_only_and_says_so_elsewhere(model, monkeypatch, caplog):
    compiled = []
    monkeypatch.setattr(compilation, "compile_networks", lambda m, **kw: compiled.append(m))
    with caplog.at_level(logging.INFO, logger="xportrait"):
        prepare_model(model, compile=True)
    assert compiled == []
    assert any("compile applies on CUDA GPUs only; running uncompiled on cpu" in r.getMessage()
               for r in caplog.records)
