"""CLIP ViT-L/14's text transformer (`cond_stage_model`), as the official FrozenCLIPEmbedder uses it.

X-Portrait only ever encodes the empty prompt, so there is no tokenizer: the official CLIP tokenizer turns "" into
the start token followed by the end token, padded to 77 with the end token again. The output is Hugging Face
`CLIPTextModel`'s `last_hidden_state` (after the final layer norm). Parameter names are HF's below
`cond_stage_model.transformer.text_model.`, so loading only strips that prefix; the `embeddings.position_ids`
buffer some checkpoints carry is deliberately not registered (positions are always 0..76).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .config import TextEncoderConfig
from .operations import Operations, operations_or_default


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # The activation OpenAI's CLIP was trained with; the exact GELU gives different numbers.
    return x * torch.sigmoid(1.702 * x)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.token_embedding(tokens) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, operations: Operations):
        super().__init__()
        self.heads = cfg.heads
        self.attention = operations.attention
        self.q_proj = operations.Linear(cfg.width, cfg.width)
        self.k_proj = operations.Linear(cfg.width, cfg.width)
        self.v_proj = operations.Linear(cfg.width, cfg.width)
        self.out_proj = operations.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (B, N, C) -> (B, heads, N, C / heads)
        q, k, v = (p(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = self.attention(q, k, v, causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, operations: Operations):
        super().__init__()
        self.fc1 = operations.Linear(cfg.width, cfg.intermediate)
        self.fc2 = operations.Linear(cfg.intermediate, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, operations: Operations):
        super().__init__()
        self.layer_norm1 = operations.LayerNorm(cfg.width)
        self.self_attn = CLIPAttention(cfg, operations)
        self.layer_norm2 = operations.LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg, operations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoderStack(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, operations: Operations):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(cfg, operations) for _ in range(cfg.layers))


class CLIPTextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig = TextEncoderConfig(), operations: Optional[Operations] = None):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"width {config.width} is not divisible by heads {config.heads}")
        ops = operations_or_default(operations)
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoderStack(config, ops)
        self.final_layer_norm = ops.LayerNorm(config.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last hidden state (B, N, width) of token ids (B, N), N <= max_length."""
        if tokens.ndim != 2 or tokens.shape[1] > self.config.max_length:
            raise ValueError(f"expected token ids (B, N <= {self.config.max_length}), got {tuple(tokens.shape)}")
        x = self.embeddings(tokens)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)


def empty_prompt_tokens(config: TextEncoderConfig = TextEncoderConfig()) -> torch.Tensor:
    """Token ids (1, max_length) of the empty prompt: start token, then the end token repeated as padding."""
    tokens = torch.full((1, config.max_length), config.end_token, dtype=torch.long)
    tokens[0, 0] = config.start_token
    return tokens


@torch.no_grad()
def encode_empty_prompt(encoder: CLIPTextEncoder) -> torch.Tensor:
    """CLIP("") as the official model conditions on it: (1, max_length, width), on the encoder's device and dtype."""
    device = encoder.final_layer_norm.weight.device
    return encoder(empty_prompt_tokens(encoder.config).to(device))
