"""The convolution-bias kernel (conv_bias.py) adds a convolution's bias (and a residual) as PyTorch's convolution
and sum do, and the Conv2d class of `fast_operations()` uses it only where it applies. The kernel runs here in
Triton's CPU interpreter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import run_interpreted

from xportrait_core.fast import conv_bias
from xportrait_core.fast.operations import fast_operations

KERNEL_CASES = r"""
from xportrait_core.fast.conv_bias import add_channel_bias
results = []
# (shape, dtype, with a residual): channel counts the blocks do not fill (80, 3), rows the blocks do not fill.
for shape, dtype, with_residual in (((2, 80, 5, 7), torch.bfloat16, False), ((2, 80, 5, 7), torch.float16, True),
                                   ((1, 3, 9, 4), torch.float32, True), ((3, 320, 4, 4), torch.bfloat16, True)):
    y = (torch.randn(*shape) * 3).to(dtype).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(shape[1]).to(dtype)
    residual = (torch.randn(*shape) * 2).to(dtype).contiguous(memory_format=torch.channels_last)
    residual = residual if with_residual else None
    out = add_channel_bias(y, bias, residual)
    ref = y.float() + bias.float()[None, :, None, None] + (0 if residual is None else residual.float())
    results.append([out.is_contiguous(memory_format=torch.channels_last), out.dtype == dtype,
                    (out.float() - ref).abs().max().item(), ref.abs().max().item(), torch.finfo(dtype).eps])
print(json.dumps(results))
"""


def test_kernel_adds_the_bias_and_a_residual_in_one_pass_channels_last():
    results = run_interpreted(KERNEL_CASES)
    assert len(results) == 4
    for channels_last, same_dtype, err, scale, eps in results:
        assert channels_last and same_dtype
        assert err <= 2 * eps * max(1.0, scale) + 1e-5, (err, scale, eps)  # one rounding of the output


MODULES = r"""
from xportrait_core.fast import conv_bias, group_norm
from xportrait_core.fast.operations import fast_operations
from xportrait_core.model.blocks import ResBlock
# The kernels' probes pass (here on the CPU, in the interpreter), and with `supports` widened to CPU tensors a
# ResBlock built from the fast operations gives what the plain one gives: its first convolution's bias joins the
# GroupNorm's shift (no pass of its own), its second is added with the skip in one pass; the skip's 1x1
# convolution (64 -> 96 channels) adds its bias alone.
usable = conv_bias._kernel_usable(torch.device("cpu"), torch.float32)
calls = []
kernel = conv_bias.add_channel_bias
conv_bias.add_channel_bias = lambda *a, **k: calls.append(len(a) > 2 and a[2] is not None) or kernel(*a, **k)
torch.manual_seed(0)
plain = ResBlock(64, 32, 96).eval()
fast = ResBlock(64, 32, 96, operations=fast_operations()).eval()
fast.load_state_dict(plain.state_dict())
x = torch.randn(2, 64, 6, 5).contiguous(memory_format=torch.channels_last)
emb = torch.randn(2, 32)
widened = lambda t: t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
with torch.no_grad():
    expected = plain(x, emb)
    conv_bias.supports = group_norm.supports = widened
    out = fast(x, emb)
print(json.dumps([usable, calls, (out - expected).abs().max().item(), expected.abs().max().item(),
                  out.is_contiguous(memory_format=torch.channels_last)]))
"""


def test_a_resblock_folds_its_convolutions_biases_and_gives_the_same_result():
    usable, calls, err, scale, channels_last = run_interpreted(MODULES)
    assert usable
    assert sorted(calls) == [False, True]  # the skip's 1x1 convolution alone; the second with the skip
    assert err < 1e-4 * max(1.0, scale)
    assert channels_last


def test_off_the_kernel_the_fast_conv2d_is_its_base_and_its_forms_are_the_plain_sums(monkeypatch):
    """On the CPU (the kernel does not apply) the fast Conv2d computes its base's convolution, forward_bias_apart
    gives the biased output and no bias, and forward_plus is residual + conv(x), exactly."""
    conv = fast_operations().Conv2d(4, 6, 3, padding=1)
    x, residual = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert torch.equal(conv(x), expected)
    out, bias = conv.forward_bias_apart(x)
    assert torch.equal(out, expected) and bias is None
    assert torch.equal(conv.forward_plus(x, residual), residual + expected)


def test_a_layer_a_host_patches_or_without_a_bias_keeps_its_bases_forward(monkeypatch):
    """A host's layer that casts or patches its weights as it runs (`defers`) and a layer without a bias leave the
    kernel alone, even where it would apply."""
    monkeypatch.setattr(conv_bias, "supports", lambda x: True)
    monkeypatch.setattr(conv_bias, "add_channel_bias", lambda *a, **k: pytest.fail("the kernel was called"))
    patched = conv_bias.with_kernel(torch.nn.Conv2d, defers=lambda layer: True)(4, 6, 1)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(patched(x), F.conv2d(x, patched.weight, patched.bias))
    assert patched.forward_bias_apart(x)[1] is None
    no_bias = fast_operations().Conv2d(4, 6, 1, bias=False)
    torch.testing.assert_close(no_bias(x), F.conv2d(x, no_bias.weight))


def test_kernel_refuses_tensors_it_cannot_read_with_a_reason():
    if conv_bias.triton is None:
        pytest.skip("triton is not installed")
    planar = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="channels-last"):
        conv_bias.add_channel_bias(planar, torch.zeros(8))
    y = planar.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="a bias of 8 channels"):
        conv_bias.add_channel_bias(y, torch.zeros(4))
