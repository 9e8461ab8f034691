"""The attention dispatch: backends agree, the choice is explained, forcing an unusable backend is an error."""
from __future__ import annotations

import logging

import pytest
import torch

from xportrait_core.model import attention as attn


@pytest.fixture(autouse=True)
def _restore_setting():
    before = attn.get_attention_backend_setting()
    yield
    attn.set_attention_backend(before)


def _qkv(batch=3, heads=4, n_q=17, n_k=29, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, n_q, dim, generator=g), torch.randn(batch, heads, n_k, dim, generator=g),
            torch.randn(batch, heads, n_k, dim, generator=g))


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_and_math_agree(causal):
    q, k, v = _qkv(n_k=17) if causal else _qkv()
    attn.set_attention_backend("sdpa")
    fast = attn.attention(q, k, v, causal=causal)
    attn.set_attention_backend("math")
    reference = attn.attention(q, k, v, causal=causal)
    assert fast.shape == q.shape
    assert (fast - reference).abs().max() < 1e-5


def test_broadcast_keys_values_match_materialised_ones():
    """The reference bank is passed as an expanded (stride-0) view; results equal a real copy."""
    q, k, v = _qkv(batch=4)
    k1, v1 = k[:1].expand(4, -1, -1, -1), v[:1].expand(4, -1, -1, -1)
    out = attn.attention(q, k1, v1)
    assert torch.allclose(out, attn.attention(q, k1.contiguous(), v1.contiguous()), atol=1e-6)


def test_auto_uses_sdpa_on_cpu_and_logs_once(caplog):
    attn.set_attention_backend("auto")
    assert attn.resolve_backend(torch.device("cpu"), torch.float32) == "sdpa"
    attn._logged.clear()
    with caplog.at_level(logging.INFO, logger="xportrait"):
        for _ in range(3):
            attn.attention(*_qkv())
    lines = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert lines == ["X-Portrait attention backend: sdpa (cpu, float32)"]


def test_forcing_xformers_where_it_cannot_run_is_a_clear_error():
    attn.set_attention_backend("xformers")
    with pytest.raises(RuntimeError, match="'xformers' cannot run: xformers runs on NVIDIA GPUs only, and this runs on the CPU"):
        attn.attention(*_qkv())


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'"):
        attn.set_attention_backend("flash3")


def test_xformers_probe_failure_falls_back(monkeypatch):
    """A wheel built for another torch imports but fails at its first kernel call: auto must fall back."""

    class BrokenOps:
        @staticmethod
        def memory_efficient_attention(*args, **kwargs):
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    monkeypatch.setattr(attn, "_xformers_ops", BrokenOps)
    monkeypatch.setattr(attn, "_xformers_works", {})
    fake_cuda = torch.device("cuda")
    # Probe on a CPU tensor stand-in: the probe itself allocates on the device, so only run it where CUDA exists.
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.zeros(1, 8, 1, 64))
    assert attn.xformers_usable(fake_cuda, torch.float16) is False
    attn.set_attention_backend("auto")
    assert attn.resolve_backend(fake_cuda, torch.float16) == "sdpa"
