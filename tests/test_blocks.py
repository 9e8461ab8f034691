"""Inference-only memory savings in the blocks compute the same values as the plain forms."""
from __future__ import annotations

import torch

from xportrait_core.blocks import Attention, FeedForward


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
        batched = attn(x, appended=bank, appended_rows=4)
        torch.testing.assert_close(batched[:4], attn(x[:4], appended=bank), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(batched[4:], attn(x[4:]), atol=1e-6, rtol=1e-6)
