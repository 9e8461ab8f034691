"""Model configuration as frozen dataclasses.

`XPortraitConfig.official()` reproduces the released checkpoint (`model_state-415001.th`, built by the official
`config/cldm_v15_appearance_pose_local_mm.yaml`); `XPortraitConfig.tiny()` is the size of the golden fixtures in
`shared/golden/tiny_config.json`. There is no YAML and no `instantiate_from_config`: a config is plain data.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class UNetConfig:
    """The SD1.5 UNet layout shared by the main UNet, the reference net and both ControlNets."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsampling factors (1 = full latent resolution) at which blocks carry a spatial transformer.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


@dataclass(frozen=True)
class MotionModuleConfig:
    """AnimateDiff "Vanilla" temporal transformers placed after UNet blocks."""

    num_heads: int = 8
    num_blocks: int = 1
    # Each block holds this many temporal self-attentions ("Temporal_Self" x2 in the official YAML).
    attentions_per_block: int = 2
    # Length of the sinusoidal positional-encoding table: no window may be longer than this.
    max_frames: int = 24
    # Frames per window the model was trained on; the sampler's default window.
    window: int = 16


@dataclass(frozen=True)
class ControlNetConfig:
    """What a ControlNet adds to the UNet layout: the hint encoder (three stride-2 stages, 8x down)."""

    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = (16, 16, 32, 32, 96, 96, 256)


@dataclass(frozen=True)
class VAEConfig:
    """The SD1.5 KL autoencoder (`first_stage_model`)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    # Latents are multiplied by this after encoding and divided by it before decoding.
    scale_factor: float = 0.18215

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP ViT-L/14's text transformer (`cond_stage_model`), used only for the empty prompt."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    start_token: int = 49406
    end_token: int = 49407


@dataclass(frozen=True)
class ScheduleConfig:
    """DDPM noise schedule: betas linear in sqrt between the two ends ("scaled linear")."""

    num_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012


@dataclass(frozen=True)
class XPortraitConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    motion: MotionModuleConfig = field(default_factory=MotionModuleConfig)
    control: ControlNetConfig = field(default_factory=ControlNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Resolution the released model was trained at; any multiple of 64 runs.
    image_size: int = 512

    @classmethod
    def official(cls) -> "XPortraitConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "XPortraitConfig":
        """The golden fixtures' size: 64x64 images, 8x8 latents, 32-wide context."""
        unet = UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), num_heads=4, context_dim=32)
        vae = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2))
        # The tiny fixtures carry no CLIP weights; this text encoder exists so tests can build one whose
        # output width matches the tiny UNet's context.
        text = TextEncoderConfig(width=32, layers=2, heads=4, intermediate=64)
        return cls(unet=unet, vae=vae, text_encoder=text, image_size=64)
