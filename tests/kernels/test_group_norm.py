"""The channels-last GroupNorm kernel (group_norm.py) computes PyTorch's GroupNorm, and the GroupNorm class of
`fast_operations()` uses it only where it applies. The kernel runs here in Triton's CPU interpreter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cuda_stand_in import CudaTensorStandIn
from triton_interpreter import run_interpreted

from xportrait_core.fast import group_norm
from xportrait_core.fast.operations import fast_operations
from xportrait_core.model.operations import GroupNorm

KERNEL_CASES = r"""
from xportrait_core.fast.group_norm import group_norm_channels_last
results = []
# (shape, groups, tile rows x channels, dtype): tiles the rows and channels do not fill, channel blocks that split
# a group, groups of one channel block; activations off centre (mean 3, deviation 2), as the variance's
# E[x^2] - E[x]^2 must cope with.
for shape, groups, blocks, dtype in (((2, 64, 5, 7), 32, (16, 32), torch.float16),
                                     ((1, 40, 9, 4), 4, (16, 16), torch.float32),
                                     ((3, 96, 4, 4), 32, (8, 64), torch.bfloat16)):
    x = (torch.randn(*shape) * 2 + 3).to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(shape[1]), torch.randn(shape[1])
    out = group_norm_channels_last(x, groups, weight.to(dtype), bias.to(dtype), 1e-5, *blocks)
    ref = torch.nn.functional.group_norm(x.float(), groups, weight.to(dtype).float(), bias.to(dtype).float(), 1e-5)
    results.append([out.is_contiguous(memory_format=torch.channels_last), out.dtype == dtype,
                    (out.float() - ref).abs().max().item(), ref.abs().max().item(), torch.finfo(dtype).eps])
print(json.dumps(results))
"""


def test_kernel_computes_pytorchs_group_norm_channels_last_in_and_out():
    for channels_last, same_dtype, err, scale, eps in run_interpreted(KERNEL_CASES):
        assert channels_last and same_dtype
        assert err <= 2 * eps * max(1.0, scale) + 1e-5, (err, scale, eps)  # one rounding of the output


MODULES = r"""
from xportrait_core.fast import group_norm
from xportrait_core.fast.operations import fast_operations
from xportrait_core.model.blocks import ResBlock
# The kernel's own probe passes (here on the CPU, in the interpreter)...
usable = group_norm._kernel_usable(torch.device("cpu"), torch.float32)
# ...and with `supports` widened to CPU tensors, a block built from the fast operations routes channels-last input
# through the kernel: a ResBlock (two GroupNorms) gives what it gives with PyTorch's GroupNorm, in the same
# memory format.
calls = []
kernel = group_norm.group_norm_channels_last
group_norm.group_norm_channels_last = lambda *a, **k: calls.append(1) or kernel(*a, **k)
block = ResBlock(64, 32, 96, operations=fast_operations()).eval()
x = torch.randn(2, 64, 6, 5).contiguous(memory_format=torch.channels_last)
emb = torch.randn(2, 32)
with torch.no_grad():
    expected = block(x, emb)
    group_norm.supports = lambda t: t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    out = block(x, emb)
print(json.dumps([usable, len(calls), (out - expected).abs().max().item(), expected.abs().max().item()]))
"""


def test_modules_run_the_kernel_where_it_applies_and_give_the_same_result():
    usable, calls, err, scale = run_interpreted(MODULES)
    assert usable
    assert calls == 2  # the ResBlock's two GroupNorms
    assert err < 1e-4 * max(1.0, scale)


def test_kernel_applies_to_cuda_half_channels_last_input_only_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(group_norm, "_kernel_usable", lambda device, dtype: True)
    monkeypatch.setattr(group_norm, "triton", object())
    monkeypatch.setattr(group_norm, "_enabled", True)
    assert group_norm.supports(CudaTensorStandIn(layout="channels_last"))
    assert group_norm.supports(CudaTensorStandIn(torch.float16, "channels_last"))
    assert not group_norm.supports(CudaTensorStandIn(torch.float32, "channels_last"))  # float32 keeps PyTorch's kernel
    assert not group_norm.supports(CudaTensorStandIn())
    assert not group_norm.supports(torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last))  # CPU
    group_norm.set_group_norm_kernel(False)
    assert not group_norm.supports(CudaTensorStandIn(layout="channels_last"))
    group_norm.set_group_norm_kernel(True)
    assert group_norm.supports(CudaTensorStandIn(layout="channels_last"))


def test_off_the_kernel_the_fast_group_norm_is_its_bases():
    fast = fast_operations().GroupNorm
    assert issubclass(fast, GroupNorm)  # same constructor, same parameters, same checkpoint keys
    x = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    norm = fast(32, 64, eps=1e-6)
    torch.testing.assert_close(norm(x), F.group_norm(x, 32, norm.weight, norm.bias, 1e-6))
    # The base's float32 statistics for half input on the CPU.
    half = x.to(torch.bfloat16)
    torch.testing.assert_close(norm(half), F.group_norm(half.float(), 32, norm.weight, norm.bias,
                                                        1e-6).to(torch.bfloat16))


def test_a_layer_whose_weights_are_not_in_the_inputs_dtype_or_device_keeps_its_bases_forward(monkeypatch):
    """A host's layers may keep weights in a storage dtype (or elsewhere) and cast them as they run: the kernel,
    which reads the parameters as they are, leaves those to the base's forward."""
    calls = []
    monkeypatch.setattr(group_norm, "supports", lambda x: True)
    monkeypatch.setattr(group_norm, "group_norm_channels_last", lambda x, *a: calls.append(1) or torch.zeros_like(x))
    layer = fast_operations().GroupNorm(4, 8)
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    assert torch.equal(layer(x), torch.zeros_like(x)) and calls == [1]  # weights as the input: the kernel
    stored = layer.to(torch.bfloat16)  # weights stored in another dtype than the float32 input
    torch.testing.assert_close(stored(x), F.group_norm(x, 4, stored.weight.float(), stored.bias.float()))
    assert calls == [1]


def test_a_layer_a_host_patches_at_every_call_keeps_its_bases_forward(monkeypatch):
    """ComfyUI puts a LoRA on a layer it left offloaded as a `weight_function` that its forward applies to the cast
    weight: the kernel, which would read the unpatched parameters, leaves such a layer to the base when the host's
    `defers` says so (nodes/native/operations.py hands in `casts_weights_now`)."""
    calls = []
    monkeypatch.setattr(group_norm, "supports", lambda x: True)
    monkeypatch.setattr(group_norm, "group_norm_channels_last", lambda x, *a: calls.append(1) or torch.zeros_like(x))

    class PatchedAtEveryCall(GroupNorm):  # a host's layer: applies its weight functions itself
        weight_function: list = []

        def forward(self, x):
            weight = self.weight
            for function in self.weight_function:
                weight = function(weight)
            return F.group_norm(x, self.num_groups, weight, self.bias, self.eps)

    layer = group_norm.with_kernel(PatchedAtEveryCall, defers=lambda m: bool(m.weight_function))(4, 8)
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    assert torch.equal(layer(x), torch.zeros_like(x)) and calls == [1]  # no patch: the kernel
    layer.weight_function = [lambda w: w * 2]
    torch.testing.assert_close(layer(x), F.group_norm(x, 4, layer.weight * 2, layer.bias))
    assert calls == [1]


SHIFT_SILU_CASES = r"""
from xportrait_core.fast.group_norm import group_norm_channels_last
results = []
# A ResBlock's second norm: x + the timestep embedding's shift (N, C), normalised, then SiLU; tiles the rows and
# channels do not fill, and a shift large against x (the statistics must be those of the sum).
for shape, groups, blocks, dtype, silu, with_shift in (((2, 64, 5, 7), 32, (16, 32), torch.float16, True, True),
                                                       ((1, 40, 9, 4), 4, (16, 16), torch.float32, True, False),
                                                       ((3, 96, 4, 4), 32, (8, 64), torch.bfloat16, False, True),
                                                       ((3, 96, 4, 4), 32, (8, 64), torch.bfloat16, True, True)):
    x = (torch.randn(*shape) * 2 + 3).to(dtype).contiguous(memory_format=torch.channels_last)
    shift = (torch.randn(shape[0], shape[1]) * 4).to(dtype) if with_shift else None
    weight, bias = torch.randn(shape[1]), torch.randn(shape[1])
    out = group_norm_channels_last(x, groups, weight.to(dtype), bias.to(dtype), 1e-5, *blocks, shift=shift,
                                   silu=silu)
    summed = x.float() + (0 if shift is None else shift.float()[:, :, None, None])
    ref = torch.nn.functional.group_norm(summed, groups, weight.to(dtype).float(), bias.to(dtype).float(), 1e-5)
    ref = torch.nn.functional.silu(ref) if silu else ref
    results.append([out.is_contiguous(memory_format=torch.channels_last), out.dtype == dtype,
                    (out.float() - ref).abs().max().item(), ref.abs().max().item(), torch.finfo(dtype).eps])
print(json.dumps(results))
"""


def test_kernel_adds_a_per_channel_shift_before_its_statistics_and_applies_silu_in_its_passes():
    results = run_interpreted(SHIFT_SILU_CASES)
    assert len(results) == 4
    for channels_last, same_dtype, err, scale, eps in results:
        assert channels_last and same_dtype
        assert err <= 2 * eps * max(1.0, scale) + 1e-5, (err, scale, eps)  # one rounding of the output


def test_off_the_kernel_norm_silu_is_the_bases_norm_after_the_sum_then_silu(monkeypatch):
    """forward_silu where the kernel does not apply (here: the CPU, or a shift of another dtype): x plus the shift,
    the base's GroupNorm, then SiLU, exactly as the separate operations give it."""
    layer = fast_operations().GroupNorm(4, 8)
    x, shift = torch.randn(2, 8, 3, 3), torch.randn(2, 8)
    expected = F.silu(GroupNorm.forward(layer, x + shift[:, :, None, None]))
    assert torch.equal(layer.forward_silu(x, shift), expected)
    assert torch.equal(layer.forward_silu(x), F.silu(GroupNorm.forward(layer, x)))
    # A shift in another dtype: the sum, the norm and SiLU as separate operations (the float64 sum is not in the
    # weights' dtype, so the base's GroupNorm normalises it).
    calls = []
    monkeypatch.setattr(group_norm, "supports", lambda x: True)
    monkeypatch.setattr(group_norm, "group_norm_channels_last",
                        lambda x, *a, **k: calls.append(k) or GroupNorm.forward(layer, x))
    assert torch.equal(layer.forward_silu(x, shift.double()),
                       F.silu(GroupNorm.forward(layer, x + shift.double()[:, :, None, None])))
    assert calls == []


def test_kernel_refuses_a_shift_of_another_shape():
    if group_norm.triton is None:
        pytest.skip("triton is not installed")
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"a shift of shape \(2, 8\) expected"):
        group_norm.group_norm_channels_last(x, 4, torch.ones(8), torch.zeros(8), 1e-5, shift=torch.zeros(8))
