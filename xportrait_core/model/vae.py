"""The SD1.5 KL autoencoder (`first_stage_model`): images in [-1, 1] <-> 4-channel latents, 8x smaller.

Module names follow the official checkpoint (`encoder.down.N.block.M...`, `decoder.up.N...`, `quant_conv`,
`post_quant_conv`) so loading only strips the `first_stage_model.` prefix. SD1.5 has attention only in the middle
blocks (`attn_resolutions` is empty), so the down/up levels hold no attention modules at all.

Scaling by `VAEConfig.scale_factor` is the caller's business: `encode` returns the unscaled posterior moments and
`decode` expects unscaled latents.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import conv_plus, conv_then_norm_silu, norm_silu
from .config import VAEConfig
from .operations import Operations, operations_or_default


def _norm(channels: int, operations: Operations) -> nn.Module:
    return operations.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        self.norm1 = _norm(in_channels, ops)
        self.conv1 = ops.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, ops)
        self.conv2 = ops.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = ops.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fused forms (blocks.py) where the layers offer them: the norms' SiLU in their own passes, conv1's bias
        # in norm2's shift, conv2's bias and the skip in one pass; the separate operations otherwise.
        h = conv_then_norm_silu(self.conv1, self.norm2, norm_silu(self.norm1, x))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return conv_plus(self.conv2, h, skip)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convolutions as projections."""

    def __init__(self, channels: int, operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        self.attention = ops.attention
        self.norm = _norm(channels, ops)
        self.q = ops.Conv2d(channels, channels, 1)
        self.k = ops.Conv2d(channels, channels, 1)
        self.v = ops.Conv2d(channels, channels, 1)
        self.proj_out = ops.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, HW, C)
        q, k, v = (proj(normed).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = self.attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int, operations: Operations):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original VAE pads only right and bottom (asymmetric), which a Conv2d padding cannot express.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int, operations: Operations):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Nearest-neighbour 2x by expand + reshape rather than F.interpolate, whose nearest kernels refuse outputs
        # past INT_MAX elements (large frames) on some devices.
        b, c, h, w = x.shape
        if c > 1 and x.is_contiguous(memory_format=torch.channels_last):
            # Channels-last activations (CUDA) stay so: the expansion runs in (N, H, W, C) order.
            x = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(b, h, 2, w, 2, c)
            return self.conv(x.reshape(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2))
        x = x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)
        return self.conv(x)


class _MidBlock(nn.Module):
    def __init__(self, channels: int, operations: Operations):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, operations)
        self.attn_1 = AttnBlock(channels, operations)
        self.block_2 = ResnetBlock(channels, channels, operations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, then an optional resampler (`downsample`/`upsample`)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, operations: Operations):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, operations) for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = ops.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_ch = cfg.ch
        for i, out_ch in enumerate(widths):
            level = _Level(in_ch, out_ch, cfg.num_res_blocks, ops)
            if i != len(widths) - 1:
                level.downsample = Downsample(out_ch, ops)
            self.down.append(level)
            in_ch = out_ch
        self.mid = _MidBlock(in_ch, ops)
        self.norm_out = _norm(in_ch, ops)
        # Mean and log-variance, hence twice the latent channels.
        self.conv_out = ops.Conv2d(in_ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(norm_silu(self.norm_out, h))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        in_ch = widths[-1]
        self.conv_in = ops.Conv2d(cfg.z_channels, in_ch, 3, padding=1)
        self.mid = _MidBlock(in_ch, ops)
        # Built from the lowest resolution up, but stored so that up[i] is the level at the encoder's down[i]
        # resolution, as in the checkpoint.
        levels = []
        for i in reversed(range(len(widths))):
            level = _Level(in_ch, widths[i], cfg.num_res_blocks + 1, ops)
            if i != 0:
                level.upsample = Upsample(widths[i], ops)
            levels.insert(0, level)
            in_ch = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(in_ch, ops)
        self.conv_out = ops.Conv2d(in_ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(norm_silu(self.norm_out, h))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig = VAEConfig(), operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        self.config = config
        self.encoder = Encoder(config, ops)
        self.decoder = Decoder(config, ops)
        self.quant_conv = ops.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = ops.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar), each (N, embed_dim, H/8, W/8), of images (N, 3, H, W) in [-1, 1]; unscaled."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (N, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        f = self.config.downsample_factor
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(images.shape[-2:])}")
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        # Same bounds as the original DiagonalGaussianDistribution, so sampled latents match it.
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, 8h, 8w), roughly in [-1, 1] and not clamped, from unscaled latents z (N, embed_dim, h, w)."""
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"expected latents (N, {self.config.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def encode_chunked(self, images: torch.Tensor, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode` over at most `chunk` images at a time, so long videos never pass through in one batch."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if images.shape[0] <= chunk:
            return self.encode(images)
        parts = [self.encode(part) for part in images.split(chunk)]
        return torch.cat([m for m, _ in parts]), torch.cat([lv for _, lv in parts])

    def decode_chunked(self, z: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """`decode` over at most `chunk` latents at a time."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if z.shape[0] <= chunk:
            return self.decode(z)
        return torch.cat([self.decode(part) for part in z.split(chunk)])
