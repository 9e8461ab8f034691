"""The LayerNorm kernel (layer_norm.py) computes PyTorch's LayerNorm over the last dimension, and the LayerNorm class
of `fast_operations()` uses it only where it applies. The kernel runs here in Triton's CPU interpreter."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from triton_interpreter import run_interpreted

from xportrait_core.fast import layer_norm
from xportrait_core.fast.operations import fast_operations

KERNEL_CASES = r"""
from xportrait_core.fast.layer_norm import layer_norm_rows
results = []
# (shape, dtype, rows a program takes or None for the default): the model's widths (320, 640, 1280), widths the
# padding to a power of two leaves ragged (77, 1000), 2-D and 3-D input, row counts the blocks do not fill;
# activations off centre (mean 3, deviation 2) with a few large values, as the variance must cope with.
for shape, dtype, block_rows in (((2, 37, 320), torch.float32, None), ((2, 37, 320), torch.bfloat16, None),
                                 ((45, 640), torch.bfloat16, None), ((3, 7, 1280), torch.bfloat16, 2),
                                 ((3, 7, 1280), torch.float32, None), ((11, 77), torch.float32, 4),
                                 ((2, 5, 77), torch.bfloat16, None), ((9, 1000), torch.bfloat16, 8),
                                 ((1, 1000), torch.float32, None), ((4, 6, 640), torch.float16, None)):
    x = torch.randn(*shape) * 2 + 3
    x.view(-1)[:: 97] *= 8
    x = x.to(dtype)
    weight, bias = (torch.randn(shape[-1]) * 0.5 + 1).to(dtype), torch.randn(shape[-1]).to(dtype)
    out = layer_norm_rows(x, weight, bias, 1e-5, block_rows)
    ref = torch.nn.functional.layer_norm(x.float(), (shape[-1],), weight.float(), bias.float(), 1e-5)
    results.append([list(out.shape), list(shape), out.dtype == dtype, out.is_contiguous(),
                    (out.float() - ref).abs().max().item(), ref.abs().max().item(), torch.finfo(dtype).eps])
print(json.dumps(results))
"""


def test_kernel_computes_pytorchs_layer_norm_at_the_models_widths():
    results = run_interpreted(KERNEL_CASES)
    assert len(results) == 10
    for out_shape, shape, same_dtype, contiguous, err, scale, eps in results:
        assert out_shape == shape and same_dtype and contiguous
        assert err <= 2 * eps * max(1.0, scale) + 1e-5, (shape, err, scale, eps)  # one rounding of the output


STRIDED_ROWS = r"""
from xportrait_core.fast.layer_norm import layer_norm_rows, rows_of
# Rows at a constant stride wider than the row: the first 320 channels of a (6, 9, 480) activation, and a
# transformer block's tokens as a channels-last map gives them ((b, c, h, w) -> (b, h*w, c), a view); both read in
# place. The same tokens from a contiguous (NCHW) map have their channels apart: no view of rows.
wide = torch.randn(6, 9, 480) * 2 + 1
part = wide[..., :320]
tokens = torch.randn(2, 320, 4, 5).contiguous(memory_format=torch.channels_last).flatten(2).transpose(1, 2)
planar = torch.randn(2, 320, 4, 5).flatten(2).transpose(1, 2)
weight, bias = torch.randn(320), torch.randn(320)
errors = []
for x in (part, tokens):
    out = layer_norm_rows(x, weight, bias, 1e-6)
    errors.append((out - torch.nn.functional.layer_norm(x, (320,), weight, bias, 1e-6)).abs().max().item())
# A weight and bias that are strided views themselves (every other element of a longer vector).
pairs = torch.randn(2, 640)
out = layer_norm_rows(tokens, pairs[0, ::2], pairs[1, ::2], 1e-6)
reference = torch.nn.functional.layer_norm(tokens, (320,), pairs[0, ::2], pairs[1, ::2], 1e-6)
errors.append((out - reference).abs().max().item())
views = [rows_of(part) is not None and rows_of(part).data_ptr() == part.data_ptr(), rows_of(part).stride(0),
         rows_of(tokens) is not None, rows_of(planar) is None, rows_of(wide.transpose(0, 1)[:, :4]) is None]
try:
    layer_norm_rows(planar, weight, bias, 1e-6)
    refused = False
except ValueError:
    refused = True
print(json.dumps([errors, views, refused]))
"""


def test_kernel_reads_strided_rows_and_parameters_in_place_and_refuses_other_layouts():
    errors, views, refused = run_interpreted(STRIDED_ROWS)
    assert len(errors) == 3 and max(errors) < 1e-5, errors
    assert views == [True, 480, True, True, True]
    assert refused


MODULES = r"""
from xportrait_core.fast import layer_norm
from xportrait_core.fast.operations import fast_operations
from xportrait_core.model.blocks import BasicTransformerBlock
# The kernel's own probe passes (here on the CPU, in the interpreter)...
usable = layer_norm._kernel_usable(torch.device("cpu"), torch.float32)
# ...and with `supports` widened to CPU tensors, a transformer block built from the fast operations routes its
# three LayerNorms through the kernel and gives what it gives with PyTorch's LayerNorm.
calls = []
kernel = layer_norm.layer_norm_rows
layer_norm.layer_norm_rows = lambda *a, **k: calls.append(tuple(a[0].shape)) or kernel(*a, **k)
block = BasicTransformerBlock(64, 2, 32, 24, bank_slot=0, operations=fast_operations()).eval()
for p in block.parameters():  # torch's LayerNorm starts at weight 1, bias 0: move them off it
    torch.nn.init.normal_(p, std=0.3)
x, context = torch.randn(2, 12, 64) * 2 + 1, torch.randn(2, 5, 24)
with torch.no_grad():
    expected = block(x, context)
    layer_norm.supports = lambda t: layer_norm.rows_of(t) is not None and not torch.is_grad_enabled()
    out = block(x, context)
print(json.dumps([usable, calls, (out - expected).abs().max().item(), expected.abs().max().item()]))
"""


def test_a_transformer_block_runs_its_three_norms_through_the_kernel_and_gives_the_same_result():
    usable, calls, err, scale = run_interpreted(MODULES)
    assert usable
    assert [tuple(c) for c in calls] == [(2, 12, 64)] * 3  # norm1, norm2, norm3
    assert err < 1e-4 * max(1.0, scale)


class _CudaRows:
    """A stand-in for a CUDA activation whose `supports` checks read only its metadata and its 2-D view: a CPU
    tensor that says it is on CUDA."""

    is_cuda = True
    device = torch.device("cuda")

    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor
        self.dtype, self.shape = tensor.dtype, tensor.shape

    def dim(self):
        return self._tensor.dim()

    def numel(self):
        return self._tensor.numel()

    def stride(self, *args):
        return self._tensor.stride(*args)

    def view(self, *shape):
        return self._tensor.view(*shape)


def test_kernel_applies_to_cuda_half_rows_outside_autograd_only_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(layer_norm, "_kernel_usable", lambda device, dtype: True)
    monkeypatch.setattr(layer_norm, "triton", object())
    monkeypatch.setattr(layer_norm, "_enabled", True)
    tokens = torch.randn(2, 16, 320, dtype=torch.bfloat16)
    with torch.no_grad():
        assert layer_norm.supports(_CudaRows(tokens))
        assert layer_norm.supports(_CudaRows(tokens.half()))
        assert layer_norm.supports(_CudaRows(tokens[0]))  # 2-D
        assert layer_norm.supports(_CudaRows(torch.randn(2, 16, 480, dtype=torch.bfloat16)[..., :320]))  # strided rows
        assert layer_norm.supports(_CudaRows(torch.randn(5, 5000, dtype=torch.bfloat16)))  # 8192 padded: fits
        assert not layer_norm.supports(_CudaRows(tokens.float()))  # float32 keeps PyTorch's kernel
        assert not layer_norm.supports(_CudaRows(tokens.transpose(1, 2).contiguous().transpose(1, 2)))  # channels apart
        assert not layer_norm.supports(_CudaRows(tokens.transpose(0, 1)))  # rows at no one stride
        assert not layer_norm.supports(_CudaRows(torch.randn(2, 10000, dtype=torch.bfloat16)))  # a row too wide
        assert not layer_norm.supports(_CudaRows(tokens[:, :0]))  # nothing to normalise
        assert not layer_norm.supports(tokens)  # CPU
        layer_norm.set_layer_norm_kernel(False)
        assert not layer_norm.supports(_CudaRows(tokens))
        layer_norm.set_layer_norm_kernel(True)
        assert layer_norm.supports(_CudaRows(tokens))
    assert not layer_norm.supports(_CudaRows(tokens))  # autograd on: PyTorch's, which it can differentiate
    with torch.no_grad():
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not layer_norm.supports(_CudaRows(tokens))  # Inductor writes its own
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        monkeypatch.setattr(layer_norm, "_kernel_usable", lambda device, dtype: False)
        assert not layer_norm.supports(_CudaRows(tokens))  # the probe failed
        monkeypatch.setattr(layer_norm, "triton", None)
        monkeypatch.setattr(layer_norm, "_kernel_usable", lambda device, dtype: True)
        assert not layer_norm.supports(_CudaRows(tokens))  # no Triton


def test_off_the_kernel_the_fast_layer_norm_is_its_base_with_the_same_keys():
    fast = fast_operations().LayerNorm
    assert issubclass(fast, nn.LayerNorm) and fast is not nn.LayerNorm
    norm, plain = fast(320, eps=1e-6), nn.LayerNorm(320, eps=1e-6)
    assert list(norm.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    plain.load_state_dict(norm.state_dict())
    x = torch.randn(2, 7, 320) * 2 + 3
    torch.testing.assert_close(norm(x), plain(x))
    torch.testing.assert_close(norm(x), F.layer_norm(x, (320,), norm.weight, norm.bias, 1e-6))
    assert norm(x).requires_grad  # the autograd route still differentiates


@pytest.fixture
def kernel_everywhere(monkeypatch):
    """`supports` true for any input, the kernel replaced by a recorder that returns zeros: which layers reach it."""
    calls = []
    monkeypatch.setattr(layer_norm, "supports", lambda x: True)
    monkeypatch.setattr(layer_norm, "layer_norm_rows", lambda x, *a: calls.append(1) or torch.zeros_like(x))
    return calls


def test_a_layer_the_kernel_cannot_read_as_it_is_keeps_its_bases_forward(kernel_everywhere):
    """Weights in another dtype than the input (a host's storage dtype), a layer without weight or bias, or one
    normalising more than the last dimension: the kernel, which reads one (C,) weight and bias as they are, leaves
    those to the base's forward."""
    calls = kernel_everywhere
    fast = fast_operations().LayerNorm
    x = torch.randn(2, 3, 8) * 2 + 1
    layer = fast(8)
    assert torch.equal(layer(x), torch.zeros_like(x)) and calls == [1]  # weights as the input: the kernel
    half = x.to(torch.bfloat16)  # float32 weights, bfloat16 input (PyTorch's CPU LayerNorm takes the mix)
    torch.testing.assert_close(layer(half), F.layer_norm(half.float(), (8,), layer.weight, layer.bias).to(half.dtype))
    no_bias = fast(8, bias=False)
    torch.testing.assert_close(no_bias(x), F.layer_norm(x, (8,), no_bias.weight, None))
    no_affine = fast(8, elementwise_affine=False)
    torch.testing.assert_close(no_affine(x), F.layer_norm(x, (8,)))
    two_dims = fast((3, 8))
    torch.testing.assert_close(two_dims(x), F.layer_norm(x, (3, 8), two_dims.weight, two_dims.bias))
    assert calls == [1]


def test_a_layer_a_host_patches_at_every_call_keeps_its_bases_forward(kernel_everywhere):
    """ComfyUI puts a LoRA on a layer it left offloaded as a `weight_function` that its forward applies to the cast
    weight: the kernel, which would read the unpatched parameters, leaves such a layer to the base when the host's
    `defers` says so (nodes/native/operations.py hands in `casts_weights_now`)."""
    calls = kernel_everywhere

    class PatchedAtEveryCall(nn.LayerNorm):  # a host's layer: applies its weight functions itself
        weight_function: list = []

        def forward(self, x):
            weight = self.weight
            for function in self.weight_function:
                weight = function(weight)
            return F.layer_norm(x, self.normalized_shape, weight, self.bias, self.eps)

    layer = layer_norm.with_kernel(PatchedAtEveryCall, defers=lambda m: bool(m.weight_function))(8)
    assert type(layer).__name__ == "PatchedAtEveryCallWithKernel" and isinstance(layer, PatchedAtEveryCall)
    x = torch.randn(2, 3, 8)
    assert torch.equal(layer(x), torch.zeros_like(x)) and calls == [1]  # no patch: the kernel
    layer.weight_function = [lambda w: w * 2]
    torch.testing.assert_close(layer(x), F.layer_norm(x, (8,), layer.weight * 2, layer.bias))
    assert calls == [1]


def test_kernel_refuses_input_it_cannot_read_with_a_reason():
    if layer_norm.triton is None:
        pytest.skip("triton is not installed")
    with pytest.raises(ValueError, match="rows lie at one stride"):
        layer_norm.layer_norm_rows(torch.randn(4, 8).t(), torch.ones(4), torch.zeros(4), 1e-5)
    with pytest.raises(ValueError, match="weight and bias of 8 channels"):
        layer_norm.layer_norm_rows(torch.randn(4, 8), torch.ones(4), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="power of two"):
        layer_norm.layer_norm_rows(torch.randn(4, 8), torch.ones(8), torch.zeros(8), 1e-5, block_rows=3)
    with pytest.raises(ValueError, match="do not fit one program's row"):
        layer_norm.layer_norm_rows(torch.randn(2, 10000), torch.ones(10000), torch.zeros(10000), 1e-5)


ADDEND_CASES = r"""
from xportrait_core.fast.layer_norm import layer_norm_rows
from xportrait_core.model.temporal import PositionalEncoding
results = []
# A motion module's sequences (pixels, frames, C) with its frame encoding as the addend (frames, C): the encoding
# of frame f goes to every row whose frame index is f, as the broadcast sum gives it; frame counts the row blocks
# do not divide (16 frames at 4 rows a program, 5 frames).
for shape, dtype, block_rows in (((6, 16, 320), torch.bfloat16, None), ((7, 5, 320), torch.float32, 4),
                                 ((3, 16, 640), torch.float16, 8)):
    x = (torch.randn(*shape) * 2 + 3).to(dtype)
    weight, bias = (torch.randn(shape[-1]) * 0.5 + 1).to(dtype), torch.randn(shape[-1]).to(dtype)
    addend = PositionalEncoding(shape[-1], 24).table(x)
    out = layer_norm_rows(x, weight, bias, 1e-5, block_rows, addend=addend)
    ref = torch.nn.functional.layer_norm(x.float(), (shape[-1],), weight.float(), bias.float(), 1e-5) + addend.float()
    results.append([list(out.shape) == list(shape), out.dtype == dtype, (out.float() - ref).abs().max().item(),
                    ref.abs().max().item(), torch.finfo(dtype).eps])
print(json.dumps(results))
"""


def test_kernel_adds_the_frame_encoding_to_each_frames_rows_in_its_one_pass():
    results = run_interpreted(ADDEND_CASES)
    assert len(results) == 3
    for same_shape, same_dtype, err, scale, eps in results:
        assert same_shape and same_dtype
        assert err <= 2 * eps * max(1.0, scale) + 1e-5, (err, scale, eps)  # one rounding of the output


MOTION_BLOCK = r"""
from xportrait_core.fast import layer_norm
from xportrait_core.fast.operations import fast_operations
from xportrait_core.model.temporal import TemporalTransformerBlock
# A motion module's transformer block from the fast operations, with `supports` widened to CPU tensors: its two
# attention norms add the frame encoding in the kernel (`addend` given), the feed-forward's norm has none, and
# the block gives what the plain operations give with the same weights.
calls = []
kernel = layer_norm.layer_norm_rows
layer_norm.layer_norm_rows = lambda *a, **k: calls.append(k.get("addend") is not None) or kernel(*a, **k)
torch.manual_seed(0)
plain = TemporalTransformerBlock(64, 8, 2, 24).eval()
fast = TemporalTransformerBlock(64, 8, 2, 24, fast_operations()).eval()
fast.load_state_dict(plain.state_dict())
x = torch.randn(5, 16, 64)
with torch.no_grad():
    expected = plain(x)
    layer_norm.supports = lambda t: True
    out = fast(x)
print(json.dumps([calls, (out - expected).abs().max().item(), expected.abs().max().item()]))
"""


def test_a_motion_block_adds_its_frame_encoding_in_the_kernel_and_gives_the_same_result():
    calls, err, scale = run_interpreted(MOTION_BLOCK)
    assert calls == [True, True, False]
    assert err < 1e-4 * max(1.0, scale)


def test_off_the_kernel_a_norm_plus_an_addend_is_the_bases_norm_plus_the_addend(monkeypatch):
    """forward_plus where the kernel does not apply (here: the CPU, or an addend of another dtype): the base's norm,
    then the sum, exactly."""
    layer = fast_operations().LayerNorm(8)
    x, addend = torch.randn(3, 4, 8), torch.randn(4, 8)
    assert torch.equal(layer.forward_plus(x, addend), F.layer_norm(x, (8,), layer.weight, layer.bias) + addend)
    # An addend in another dtype: the kernel may still normalise, but the sum is the separate operation.
    calls = []
    monkeypatch.setattr(layer_norm, "supports", lambda x: True)
    monkeypatch.setattr(layer_norm, "layer_norm_rows",
                        lambda x, w, b, eps, **k: calls.append(k) or F.layer_norm(x, (8,), w, b, eps))
    assert torch.equal(layer.forward_plus(x, addend.double()),
                       F.layer_norm(x, (8,), layer.weight, layer.bias) + addend.double())
    assert calls == [{}]


def test_kernel_refuses_an_addend_that_does_not_match_the_frames():
    if layer_norm.triton is None:
        pytest.skip("triton is not installed")
    with pytest.raises(ValueError, match=r"an addend of shape \(4, 8\) expected"):
        layer_norm.layer_norm_rows(torch.randn(3, 4, 8), torch.ones(8), torch.zeros(8), 1e-5,
                                   addend=torch.zeros(5, 8))
