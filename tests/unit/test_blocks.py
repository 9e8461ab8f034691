"""Inference-only memory savings in the blocks compute the same values as the plain forms."""
from __future__ import annotations

import dataclasses

import torch

from xportrait_core.model.blocks import Attention, FeedForward
from xportrait_core.model.operations import torch_operations


def test_feed_forward_in_slices_equals_one_pass(monkeypatch):
    torch.manual_seed(0)
    ff = FeedForward(32)
    x = torch.randn(10, 7, 32)
    with torch.no_grad():
        whole = ff(x)
        monkeypatch.setattr(FeedForward, "chunk_bytes", 7 * 256 * 4 * 3)  # three rows of the projection per slice
        sliced = ff(x)
    torch.testing.assert_close(sliced, whole, atol=1e-6, rtol=1e-6)
    # With autograd on it takes the plain path, so gradients flow as usual.
    x.requires_grad_(True)
    ff(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bank_reaches_only_the_conditional_rows():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8)
    x = torch.randn(6, 5, 16)
    bank = torch.randn(1, 4, 16)
    with torch.no_grad():
        batched = attn(x, bank=bank, conditional_rows=4)
        torch.testing.assert_close(batched[:4], attn(x[:4], bank=bank), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(batched[4:], attn(x[4:]), atol=1e-6, rtol=1e-6)


def test_attention_output_reaches_the_projection_without_a_transposing_copy():
    """SDPA's CUDA kernels return (B, H, N, D) lying as (B, N, H, D); the output projection reads that as (B, N, H*D)
    with no copy, also when the bank reaches only the first rows and the two parts are joined."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def cuda_like_attention(q, k, v, *, causal=False):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # the values, in the CUDA kernels' layout

    operations = dataclasses.replace(torch_operations(), attention=cuda_like_attention)
    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
                copies.append(func)
            return func(*args, **(kwargs or {}))

    layer = Attention(32, heads=4, dim_head=8, operations=operations).eval()
    x, bank = torch.randn(6, 10, 32), torch.randn(1, 7, 32)
    with torch.no_grad():
        expected = torch.cat([layer(x[:4], bank=bank), layer(x[4:])])
        with Copies():
            out = layer(x, bank=bank, conditional_rows=4)
            plain = layer(x)
    assert copies == []
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(plain, layer(x))


def test_the_motion_modules_positions_follow_the_activations_to_their_device():
    """Partial loading (ComfyUI's --lowvram) moves only layers with weights to the GPU: the positional encoding's
    buffer may stay behind, and must meet the activations where they are (here the meta device stands in for the
    GPU, the buffer staying on the CPU)."""
    from xportrait_core.model.temporal import PositionalEncoding

    encoding = PositionalEncoding(8, max_len=16)
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(encoding(x), x + encoding.pe[:, :5].to(torch.bfloat16))
    assert encoding(x.to("meta")).device.type == "meta"
