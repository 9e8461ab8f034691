"""The GEGLU activation kernel (geglu.py) computes value * gelu(gate) as PyTorch does, and a model built from
`fast_operations()` uses it only where it applies. The kernel runs here in Triton's CPU interpreter."""
from __future__ import annotations

import pytest
import torch
from cuda_stand_in import CudaTensorStandIn
from triton_interpreter import run_interpreted

from xportrait_core.fast import geglu
from xportrait_core.fast.operations import fast_operations
from xportrait_core.model.blocks import GEGLU

KERNEL_CASES = r"""
from xportrait_core.fast.geglu import gated_gelu
from xportrait_core.model.operations import gated_gelu as reference_gated_gelu
results = []
# (shape, tile rows x columns, dtype): rows and columns the tiles do not fill, a leading batch axis, gates far out
# in both tails (gelu ~ identity above, ~ 0 below) and around 0.
for shape, blocks, dtype in (((2, 7, 2 * 40), (4, 16), torch.float16), ((13, 2 * 96), (8, 64), torch.bfloat16),
                             ((3, 5, 2 * 24), (8, 32), torch.float32)):
    projection = (torch.randn(*shape) * 4).to(dtype)
    out = gated_gelu(projection, *blocks)
    ref = reference_gated_gelu(projection.float())
    results.append([list(out.shape), out.dtype == dtype, (out.float() - ref).abs().max().item(),
                    ref.abs().max().item(), torch.finfo(dtype).eps])
print(json.dumps(results))
"""


def test_kernel_computes_value_times_exact_gelu_of_the_gate():
    for shape, same_dtype, err, scale, eps in run_interpreted(KERNEL_CASES):
        assert same_dtype and shape[-1] in (40, 96, 24)
        assert err <= 2 * eps * max(1.0, scale) + 1e-5, (err, scale, eps)  # one rounding of the output


MODULES = r"""
from xportrait_core.fast import geglu
from xportrait_core.fast.operations import fast_operations
from xportrait_core.model.blocks import FeedForward
usable = geglu._kernel_usable(torch.device("cpu"), torch.float32)
# With `supports` widened to CPU tensors, a feed-forward (sliced into chunks, as at full size) routes every slice
# through the kernel and gives what PyTorch's pair gives.
calls = []
kernel = geglu.gated_gelu
geglu.gated_gelu = lambda p: calls.append(tuple(p.shape)) or kernel(p)
ff = FeedForward(16, operations=fast_operations()).eval()
ff.chunk_bytes = 3 * 5 * 128 * 4  # slices of 3 rows
x = torch.randn(7, 5, 16)
with torch.no_grad():
    expected = ff(x)
    geglu.supports = lambda p: not torch.is_grad_enabled() and p.is_contiguous()
    out = ff(x)
print(json.dumps([usable, calls, (out - expected).abs().max().item(), expected.abs().max().item()]))
"""


def test_feed_forward_runs_the_kernel_on_every_slice_and_gives_the_same_result():
    usable, calls, err, scale = run_interpreted(MODULES)
    assert usable
    assert [tuple(c) for c in calls] == [(3, 5, 128), (3, 5, 128), (1, 5, 128)]
    assert err < 1e-5 * max(1.0, scale)


def test_kernel_applies_to_cuda_half_inference_only_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(geglu, "_kernel_usable", lambda device, dtype: True)
    monkeypatch.setattr(geglu, "triton", object())
    monkeypatch.setattr(geglu, "_enabled", True)
    with torch.no_grad():
        assert geglu.supports(CudaTensorStandIn(dim=2))
        assert geglu.supports(CudaTensorStandIn(torch.float16, dim=2))
        assert not geglu.supports(CudaTensorStandIn(torch.float32, dim=2))  # float32 keeps PyTorch's pair
        assert not geglu.supports(CudaTensorStandIn(layout="strided", dim=2))
        assert not geglu.supports(torch.randn(2, 8))  # CPU
        geglu.set_geglu_kernel(False)
        assert not geglu.supports(CudaTensorStandIn(dim=2))
        geglu.set_geglu_kernel(True)
    assert not geglu.supports(CudaTensorStandIn(dim=2))  # autograd on: PyTorch's ops, which it can differentiate


def test_off_the_kernel_geglu_is_value_times_gelu_of_the_gate():
    layer = GEGLU(8, 12, fast_operations())
    x = torch.randn(3, 8)
    value, gate = layer.proj(x).chunk(2, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), value * torch.nn.functional.gelu(gate))
    assert layer(x).requires_grad  # the autograd route still differentiates


def test_kernel_refuses_an_odd_or_strided_projection():
    if geglu.triton is None:
        pytest.skip("triton is not installed")
    with pytest.raises(ValueError, match="even width"):
        geglu.gated_gelu(torch.randn(2, 7))
    with pytest.raises(ValueError, match="contiguous"):
        geglu.gated_gelu(torch.randn(8, 4).t())
