"""The block library every network of the model is built from: the main UNet, the reference net and both
ControlNets use these same classes (the VAE and the motion modules have their own, small ones). Every layer comes
from the `Operations` passed in (None: plain PyTorch), so a block never names a layer class or kernel itself.

Submodule names follow the SD1.5 / ldm layout (`in_layers.0`, `emb_layers.1`, `attn1.to_q`, ...), so the official
checkpoint maps onto them by prefix alone; see checkpoint.py.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .operations import Operations, operations_or_default
from .reference_bank import ReferenceBank


def normalization(channels: int, operations: Operations) -> nn.Module:
    return operations.GroupNorm(32, channels)


def norm_silu(norm: nn.Module, x: torch.Tensor, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(norm(x + shift[:, :, None, None])), shift (N, C) optional.

    A norm layer that offers `forward_silu(x, shift)` (the accelerated GroupNorm of fast/group_norm.py) computes it
    in its own passes over x: the sum and the activation would otherwise be two more passes of their own.
    """
    fused = getattr(norm, "forward_silu", None)
    if fused is not None:
        return fused(x, shift)
    if shift is not None:
        x = x + shift[:, :, None, None]
    return F.silu(norm(x))


def conv_then_norm_silu(conv: nn.Module, norm: nn.Module, x: torch.Tensor,
                        shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """norm_silu(norm, conv(x), shift).

    A convolution that offers `forward_bias_apart(x)` (the accelerated Conv2d of fast/conv_bias.py) hands its bias
    over instead of adding it in a pass of its own: a per-channel constant, it joins the shift the norm adds.
    """
    apart = getattr(conv, "forward_bias_apart", None)
    if apart is None:
        return norm_silu(norm, conv(x), shift)
    y, bias = apart(x)
    if bias is not None:
        shift = bias.expand(y.shape[0], -1) if shift is None else shift + bias
    return norm_silu(norm, y, shift)


def conv_plus(conv: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + conv(x).

    A convolution that offers `forward_plus(x, residual)` (fast/conv_bias.py) adds its bias and the residual in one
    pass: two passes over the output otherwise (the bias, then the sum).
    """
    fused = getattr(conv, "forward_plus", None)
    if fused is not None:
        return fused(x, residual)
    return residual + conv(x)


def norm_plus(norm: nn.Module, x: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
    """norm(x) + addend, addend (P, C) broadcast over x (..., P, C).

    A norm layer that offers `forward_plus(x, addend)` (the accelerated LayerNorm of fast/layer_norm.py) adds it as
    it writes its output: the broadcast sum would otherwise be a pass of its own.
    """
    fused = getattr(norm, "forward_plus", None)
    if fused is not None:
        return fused(x, addend)
    return norm(x) + addend


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, shape (N, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedding(nn.Sequential):
    """time_embed: Linear -> SiLU -> Linear on the sinusoidal embedding."""

    def __init__(self, model_channels: int, embed_dim: int, operations: Optional[Operations] = None):
        ops = operations_or_default(operations)
        super().__init__(ops.Linear(model_channels, embed_dim), nn.SiLU(), ops.Linear(embed_dim, embed_dim))
        self.model_channels = model_channels

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The embedding of `timesteps` computed in `dtype`, the network's activations' (not the weights': they
        may be stored in fp8)."""
        t_emb = timestep_embedding(timesteps, self.model_channels)
        return super().forward(t_emb.to(dtype))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between, and a skip connection."""

    def __init__(self, channels: int, emb_channels: int, out_channels: Optional[int] = None,
                 operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels, ops), nn.SiLU(),
                                       ops.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels, ops), nn.SiLU(), nn.Dropout(0.0),
                                        ops.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else ops.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # in_layers and out_layers keep their Sequential form for the checkpoint's keys; they run as norm_silu then
        # the convolution, the timestep embedding added inside the second norm_silu (the dropout is inactive), the
        # skip added with the last convolution's bias.
        norm_in, _, conv_in = self.in_layers
        norm_out, _, _, conv_out = self.out_layers
        shift = self.emb_layers(emb).type(x.dtype)
        h = conv_then_norm_silu(conv_in, norm_out, norm_silu(norm_in, x), shift)
        return conv_plus(conv_out, h, self.skip_connection(x))


class Downsample(nn.Module):
    def __init__(self, channels: int, operations: Optional[Operations] = None):
        super().__init__()
        self.op = operations_or_default(operations).Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, operations: Optional[Operations] = None):
        super().__init__()
        self.conv = operations_or_default(operations).Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class FeedForward(nn.Module):
    """GEGLU feed-forward (x * gelu(gate), 4x inner width), as SD1.5's transformers and AnimateDiff use.

    Its inner activations are the largest tensors of the UNet (a motion module at full latent resolution in a
    batched guidance pass), and every token is computed on its own, so without autograd it runs over slices of the
    leading axis that keep the projection under `chunk_bytes`: the same values, a lower memory peak, matrix
    products still tall enough to keep the GPU busy.
    """

    chunk_bytes = 256 * 2**20

    def __init__(self, dim: int, mult: int = 4, operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner, ops), nn.Dropout(0.0), ops.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projection_bytes = x.numel() // x.shape[-1] * self.net[0].proj.out_features * x.element_size()
        chunks = min(x.shape[0], -(-projection_bytes // self.chunk_bytes))
        if torch.is_grad_enabled() or chunks <= 1:
            return self.net(x)
        out = x.new_empty(x.shape[:-1] + (self.net[2].out_features,))
        for part, target in zip(x.chunk(chunks), out.chunk(chunks)):
            target.copy_(self.net(part))
        return out


class GEGLU(nn.Module):
    """Projection to [value | gate], then value * gelu(gate) by the operations' `gated_gelu`."""

    def __init__(self, dim_in: int, dim_out: int, operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        self.proj = ops.Linear(dim_in, dim_out * 2)
        self.gated_gelu = ops.gated_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gated_gelu(self.proj(x))


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections.

    `bank` holds extra key/value tokens (this block's reference-bank entry) appended after the context's own: the
    official model attends over cat([x, bank]) along tokens. The bank usually has batch 1 while `x` holds every
    frame, so its keys and values are projected once and broadcast over the frames instead of projecting a copy
    per frame. `conditional_rows` limits the bank to the first rows of the batch: in a batched guidance pass the
    rows after them are the unconditional branch, which attends over its own tokens only.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: Optional[int] = None,
                 operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.attention = ops.attention
        self.to_q = ops.Linear(query_dim, inner, bias=False)
        self.to_k = ops.Linear(context_dim, inner, bias=False)
        self.to_v = ops.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(ops.Linear(inner, query_dim), nn.Dropout(0.0))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                bank: Optional[torch.Tensor] = None, conditional_rows: Optional[int] = None) -> torch.Tensor:
        context = x if context is None else context
        batch = x.shape[0]
        q = self._heads(self.to_q(x))
        k = self.to_k(context)
        v = self.to_v(context)
        if k.shape[0] != batch:  # a context shared by every frame (batch 1)
            k, v = k.expand(batch, -1, -1), v.expand(batch, -1, -1)
        # Outputs (B, H, N, D) are taken as (B, N, H, D): the layout SDPA's and the frame kernel's outputs lie in,
        # which the output projection reads as (B, N, H*D) without a copy.
        if bank is None:
            out = self.attention(q, self._heads(k), self._heads(v)).transpose(1, 2)
        else:
            rows = batch if conditional_rows is None else conditional_rows
            k_bank, v_bank = self.to_k(bank), self.to_v(bank)
            if k_bank.shape[0] != rows:
                k_bank, v_bank = k_bank.expand(rows, -1, -1), v_bank.expand(rows, -1, -1)
            out = self.attention(q[:rows], self._heads(torch.cat([k[:rows], k_bank], dim=1)),
                                 self._heads(torch.cat([v[:rows], v_bank], dim=1))).transpose(1, 2)
            if rows < batch:
                # Joined in that layout too: joined as (B, H, N, D), the result would need a transposing copy.
                unconditional = self.attention(q[rows:], self._heads(k[rows:]), self._heads(v[rows:]))
                out = torch.cat([out, unconditional.transpose(1, 2)])
        return self.to_out(out.reshape(batch, -1, q.shape[1] * q.shape[3]))


class BasicTransformerBlock(nn.Module):
    """Self-attention (optionally extended by the reference bank), cross-attention to the text, feed-forward.

    `bank_slot` is this block's position among all transformer blocks of its network (input, middle, output
    order); the reference net writes entry `bank_slot` and the main UNet's block of the same slot reads it.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, bank_slot: int,
                 operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        self.bank_slot = bank_slot
        self.attn1 = Attention(dim, heads, dim_head, operations=ops)
        self.ff = FeedForward(dim, operations=ops)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim, operations=ops)
        self.norm1 = ops.LayerNorm(dim)
        self.norm2 = ops.LayerNorm(dim)
        self.norm3 = ops.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bank: Optional[torch.Tensor] = None,
                recorded: Optional[list] = None, conditional_rows: Optional[int] = None) -> torch.Tensor:
        """bank: this block's reference-bank entry, added to the self-attention's keys and values (main UNet),
        for the first `conditional_rows` rows only if given. recorded: a list that receives the self-attention's
        input (the reference net filling the bank)."""
        h = self.norm1(x)
        if recorded is not None:
            recorded.append(h)
        x = self.attn1(h, bank=bank, conditional_rows=conditional_rows) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, transformer blocks over the H*W tokens, 1x1 conv out, residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, first_bank_slot: int,
                 operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        inner = heads * dim_head
        self.norm = ops.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = ops.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, bank_slot=first_bank_slot + d, operations=ops)
            for d in range(depth)
        )
        self.proj_out = ops.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bank: Optional[Sequence[torch.Tensor]] = None,
                recorded: Optional[list] = None, conditional_rows: Optional[int] = None) -> torch.Tensor:
        """bank: one reference-bank entry per transformer block, or None; recorded, conditional_rows: as
        BasicTransformerBlock's."""
        b, c, height, width = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)
        for i, block in enumerate(self.transformer_blocks):
            h = block(h, context, None if bank is None else bank[i], recorded, conditional_rows)
        h = h.transpose(1, 2).reshape(b, -1, height, width)
        return self.proj_out(h) + x

    def forward_with_bank(self, x: torch.Tensor, context: torch.Tensor, bank: Optional[ReferenceBank] = None,
                          conditional_rows: Optional[int] = None) -> torch.Tensor:
        """`forward`, writing to or reading from the reference bank by the blocks' slots (reading it for the first
        `conditional_rows` rows of the batch only, if given).

        The bank is handled here, outside `forward`, so a compiled forward sees only tensors and lists: no guard
        on the bank's state, hence no recompilation for every slot.
        """
        if bank is None:
            return self(x, context)
        if bank.recording:
            recorded: list[torch.Tensor] = []
            x = self(x, context, recorded=recorded)
            for block, tokens in zip(self.transformer_blocks, recorded):
                bank.write(block.bank_slot, tokens)
            return x
        return self(x, context, bank=[bank.read(block.bank_slot) for block in self.transformer_blocks],
                    conditional_rows=conditional_rows)
