"""The Triton kernel for attention along frames (frame_attention.py).

On a CPU machine the kernel runs in Triton's interpreter (numpy), in a subprocess because the interpreter is chosen
when the kernel is defined; on a GPU tests/test_cuda.py runs it for real. Triton is a test dependency on Linux
x86-64 (CUDA builds of torch bring it): under CI its absence fails these tests.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xportrait_core.fast import frame_attention
from xportrait_core.fast.operations import fast_operations
from xportrait_core.model import attention
from xportrait_core.model.operations import torch_operations

ROOT = Path(__file__).resolve().parents[2]

needs_triton = pytest.mark.skipif(
    not frame_attention.available() and not os.environ.get("CI"),
    reason="triton is not installed (it is a test dependency on Linux x86-64)",
)

# (sequences, tokens, heads, head dim): the motion modules' shapes in miniature (head dims 40/80/160 are SD1.5's),
# sequence counts that do not fill the last program, and the 24-frame maximum window.
SHAPES = [(37, 16, 8, 40), (5, 12, 2, 80), (3, 24, 2, 160), (9, 16, 1, 16), (1, 3, 1, 8)]

INTERPRETED = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from xportrait_core.fast import frame_attention
torch.manual_seed(0)
errors = []
for batch, tokens, heads, dim in json.loads(sys.argv[1]):
    # q, k, v as Attention hands them over: (batch, heads, tokens, dim) views of one (batch, tokens, 3, heads,
    # dim) projection output, so none is contiguous.
    x = torch.randn(batch, tokens, 3, heads, dim, dtype=torch.float16)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    out = frame_attention._launch(q, k, v).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    errors.append([list(out.shape), (out.float() - ref).abs().max().item(), ref.abs().max().item()])
print(json.dumps(errors))
"""


@needs_triton
def test_kernel_matches_sdpa_in_the_interpreter():
    assert frame_attention.available(), "triton is missing (pip install -e '.[test]' brings it on Linux x86-64)"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", INTERPRETED, json.dumps(SHAPES)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for (batch, tokens, heads, dim), (shape, err, scale) in zip(SHAPES, results):
        assert shape == [batch, heads, tokens, dim]
        # fp16 inputs, float32 scores and softmax, fp16 weights times v: flash attention's rounding.
        assert err < 2e-3 * max(1.0, scale), (batch, tokens, heads, dim, err)


def test_dispatch_takes_only_what_the_kernel_handles():
    q = torch.randn(4, 2, 16, 8)
    assert not frame_attention.supports(q, q, q, causal=False)  # CPU float32
    if torch.cuda.is_available():
        h = q.cuda().half()
        assert frame_attention.supports(h, h, h, causal=False)
        assert not frame_attention.supports(h, h, h, causal=True)
        long = torch.randn(4, 2, frame_attention.MAX_TOKENS + 1, 8, device="cuda", dtype=torch.half)
        assert not frame_attention.supports(long, long, long, causal=False)
        assert not frame_attention.supports(h.float(), h.float(), h.float(), causal=False)


@needs_triton
def test_launch_config_fills_the_gpu_and_keeps_whole_sequences():
    # 4096 pixels x 8 heads of 16 frames, head dim 40: one sequence a program, two warps (fastest measured).
    assert frame_attention.launch_config(4096, 8, 16, 40, 132) == (16, 2)
    # Head dim 80 pads to 128: four sequences a program, eight warps.
    assert frame_attention.launch_config(1024, 8, 16, 80, 132) == (64, 8)
    # Few sequences: tiles shrink until there are two programs per multiprocessor, never below one sequence.
    assert frame_attention.launch_config(16, 8, 16, 80, 132)[0] == 16
    # A 24-frame sequence pads to 32 rows.
    assert frame_attention.launch_config(1, 1, 24, 40, 132)[0] == 32


def test_a_kernel_that_cannot_run_falls_back_to_the_backend_with_one_warning(monkeypatch, caplog):
    """Triton installed but unable to build its launcher (no C compiler, say): the probe fails once, the fast
    operations' attention serves those sequences with the base's dispatch, and the job goes on."""
    def broken(q, k, v):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(frame_attention, "supports", lambda q, k, v, causal: not causal)
    monkeypatch.setattr(frame_attention, "frame_attention", broken)
    monkeypatch.setattr(frame_attention, "_works", {})
    fast_attention = fast_operations().attention
    q, k, v = (torch.randn(5, 2, 16, 8) for _ in range(3))
    with caplog.at_level("WARNING", logger="xportrait"):
        out = fast_attention(q, k, v)
        again = fast_attention(q, k, v)
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6)
    assert torch.equal(out, again)
    warnings = [r for r in caplog.records if "frame-attention kernel cannot run" in r.getMessage()]
    assert len(warnings) == 1 and "C compiler" in warnings[0].getMessage()


def test_a_working_kernel_is_used_for_short_sequences_only(monkeypatch):
    calls = []

    def fake(q, k, v):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(frame_attention, "supports",
                        lambda q, k, v, causal: not causal and q.shape[2] <= frame_attention.MAX_TOKENS)
    monkeypatch.setattr(frame_attention, "frame_attention", fake)
    monkeypatch.setattr(frame_attention, "_works", {})
    fast_attention = fast_operations().attention
    short = torch.randn(4, 2, 16, 8)
    long = torch.randn(1, 2, 64, 8)
    fast_attention(short, short, short)
    fast_attention(long, long, long)
    assert calls[0] == (3, 2, 16, 32)  # the probe
    assert calls[1:] == [short.shape]  # the long sequence went to the base's dispatch (SDPA)
    # Off by its switch, or under the math backend (kept for checking values), the kernel is not used.
    frame_attention.set_frame_kernel(False)
    try:
        fast_attention(short, short, short)
    finally:
        frame_attention.set_frame_kernel(True)
    before = attention.get_attention_backend_setting()
    attention.set_attention_backend("math")
    try:
        math_out = fast_attention(short, short, short)
    finally:
        attention.set_attention_backend(before)
    assert len(calls) == 2
    assert torch.allclose(math_out, torch.nn.functional.scaled_dot_product_attention(short, short, short), atol=1e-5)


def test_the_base_attention_gets_every_call_the_kernel_does_not_take(monkeypatch):
    """fast_operations(base) keeps the base's attention for what the kernel leaves: causal masks (CLIP),
    cross-attention, long sequences, CPU tensors."""
    seen = []

    def base(q, k, v, *, causal=False):
        seen.append((tuple(q.shape), tuple(k.shape), causal))
        return torch.zeros_like(q)

    fast_attention = fast_operations(dataclasses.replace(torch_operations(), attention=base)).attention
    q, k = torch.randn(2, 1, 16, 8), torch.randn(2, 1, 7, 8)
    fast_attention(q, q, q)
    fast_attention(q, k, k)
    fast_attention(q, q, q, causal=True)
    assert seen == [((2, 1, 16, 8), (2, 1, 16, 8), False), ((2, 1, 16, 8), (2, 1, 7, 8), False),
                    ((2, 1, 16, 8), (2, 1, 16, 8), True)]
