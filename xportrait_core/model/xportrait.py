"""X-Portrait: the whole network, and the two predictions the sampler asks of it.

    reference net  (UNet copy)      reference latent  --writes-->  reference bank
    global ControlNet               aligned driving frame   --> residuals x global_strength --+
    local ControlNet                eye/mouth patches       --> residuals x local_strength  --+--> UNet skips
    UNet + motion modules           noisy window latents + bank + residuals --> eps

`eps_cond` is the official conditional branch (reference attention and both controls); `eps_uncond` the
unconditional one (UNet and motion modules only). Guidance and windows live in the sampler.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .config import XPortraitConfig
from .motion_control import ControlNet, combine_motion_residuals
from .operations import Operations, operations_or_default
from .reference_bank import ReferenceBank
from .schedule import make_alphas_cumprod
from .text_encoder import CLIPTextEncoder, encode_empty_prompt
from .unet import UNet
from .vae import AutoencoderKL


class MissingTextEncoderError(ValueError):
    pass


class XPortrait(nn.Module):
    """All networks, built from one `Operations` (None: plain PyTorch; see operations.py)."""

    def __init__(self, config: XPortraitConfig = XPortraitConfig.official(), with_text_encoder: bool = True,
                 operations: Optional[Operations] = None):
        super().__init__()
        ops = operations_or_default(operations)
        self.config = config
        self.operations = ops
        self.unet = UNet(config.unet, motion=config.motion, operations=ops)
        self.reference_net = UNet(config.unet, with_out=False, operations=ops)
        self.global_control = ControlNet(config.unet, config.control, ops)
        self.local_control = ControlNet(config.unet, config.control, ops)
        self.vae = AutoencoderKL(config.vae, ops)
        self.text_encoder = CLIPTextEncoder(config.text_encoder, ops) if with_text_encoder else None
        # A plain float32 tensor, not a buffer: `model.half()` must not round the noise schedule.
        self.alphas_cumprod = make_alphas_cumprod(config.schedule)
        self._empty_prompt: Optional[torch.Tensor] = None
        self.memory_format = torch.contiguous_format

    # Where the networks compute: where their weights are, unless a host that keeps some weights elsewhere
    # (ComfyUI's partial loading casts each offloaded layer's weights onto the inputs' device as it runs) says so.
    compute_device: Optional[torch.device] = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the networks compute in, and take their inputs in: their norms' weights are always held in it
        (a GroupNorm's here), whatever the Linear and Conv2d weights are stored in."""
        return self.unet.out[0].weight.dtype

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype the diffusion networks' Linear and Conv2d weights are held in: `dtype`, or fp8 where they are
        stored narrow (weight_storage.py) and their layers cast them at every call."""
        return self.unet.time_embed[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.compute_device or self.unet.time_embed[0].weight.device

    def _timesteps(self, t, batch: int) -> torch.Tensor:
        if isinstance(t, int):
            # A fill kernel, not a host-to-device copy: copies from pageable memory stall the host until the GPU
            # has drained its queue, which would serialise kernel launches with execution at every call.
            return torch.full((batch,), t, device=self.device, dtype=torch.long)
        t = torch.as_tensor(t, device=self.device)
        return t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)

    def _inputs(self, *tensors):
        return [None if x is None else self._placed(x) for x in tensors]

    def _placed(self, x: torch.Tensor) -> torch.Tensor:
        # Asynchronous only towards a GPU: a non-blocking copy to the host could be read before it lands.
        x = x.to(device=self.device, dtype=self.dtype, non_blocking=self.device.type == "cuda")
        # Images and latents follow the networks' memory format (channels-last after `use_channels_last`).
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    # ---- appearance ---------------------------------------------------------------------------------------

    def reference_bank(self, reference_latents: torch.Tensor, t, context: torch.Tensor) -> ReferenceBank:
        """Run the reference net on R reference latents (R, 4, h, w) (scaled, not noised) at timestep t.

        With one shared context (1, 77, C) it runs once at batch R, whatever the number of frames. A per-frame
        context (F, 77, C) needs a bank per frame (batch R*F), as the official code computes for every frame.
        """
        latents, context = self._inputs(reference_latents, context)
        num_refs, num_contexts = latents.shape[0], context.shape[0]
        if num_contexts > 1:
            latents = latents.repeat_interleave(num_contexts, dim=0)
            context = context.repeat(num_refs, 1, 1)
        bank = ReferenceBank(num_references=num_refs)
        self.reference_net(latents, self._timesteps(t, latents.shape[0]), context, bank=bank)
        return bank.finish()

    # ---- predictions ----------------------------------------------------------------------------------------

    def encode_motion_hints(self, global_hint: Optional[torch.Tensor], local_hint: Optional[torch.Tensor],
                            chunk: int = 16) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Hint images (F, 3, H, W) in [-1, 1] -> each ControlNet's hint features (F, C, H/8, W/8), in the
        model's dtype on its device, `chunk` frames at a time. Pass them to `eps_cond` / `eps_branches` with
        `hints_encoded=True`: the same residuals, without re-encoding the hints at every step."""
        encoded = []
        for control, hint in ((self.global_control, global_hint), (self.local_control, local_hint)):
            if hint is None:
                encoded.append(None)
                continue
            with torch.no_grad():
                encoded.append(torch.cat([control.encode_hint(self._placed(hint[i:i + chunk]))
                                          for i in range(0, len(hint), chunk)]))
        return encoded[0], encoded[1]

    def _control_residuals(self, x, ts, context, global_hint, local_hint, global_strength: float,
                        local_strength: float, hints_encoded: bool = False) -> Optional[list[torch.Tensor]]:
        """Both ControlNets' residuals, scaled and summed (a strength of 0 or no hint skips that ControlNet). Only
        the sum outlives this call, so one set of skip-sized residuals is alive while the UNet runs."""
        global_residuals = local_residuals = None
        if global_hint is not None and global_strength != 0:
            global_residuals = self.global_control(x, global_hint, ts, context, hint_encoded=hints_encoded)
        if local_hint is not None and local_strength != 0:
            local_residuals = self.local_control(x, local_hint, ts, context, hint_encoded=hints_encoded)
        return combine_motion_residuals(global_residuals, global_strength, local_residuals, local_strength)

    def eps_cond(self, x: torch.Tensor, t, context: torch.Tensor, bank: ReferenceBank,
                 global_hint: Optional[torch.Tensor] = None, local_hint: Optional[torch.Tensor] = None,
                 global_strength: float = 1.0, local_strength: float = 1.0,
                 num_frames: Optional[int] = None, hints_encoded: bool = False) -> torch.Tensor:
        """Noise prediction with reference attention and hierarchical motion control. x (F, 4, h, w) is one window
        (or several of `num_frames` each); hints (F, 3, H, W) in [-1, 1], or their `encode_motion_hints` features
        with hints_encoded=True. A strength of 0 skips that ControlNet."""
        x, context, global_hint, local_hint = self._inputs(x, context, global_hint, local_hint)
        ts = self._timesteps(t, x.shape[0])
        control = self._control_residuals(x, ts, context, global_hint, local_hint, global_strength, local_strength,
                                       hints_encoded)
        eps = self.unet(x, ts, context, bank=bank, control=control, num_frames=num_frames)
        return eps.float()

    def eps_branches(self, x: torch.Tensor, t, context: torch.Tensor, uncond_context: torch.Tensor,
                     bank: ReferenceBank, global_hint: Optional[torch.Tensor] = None,
                     local_hint: Optional[torch.Tensor] = None, global_strength: float = 1.0,
                     local_strength: float = 1.0, num_frames: Optional[int] = None,
                     hints_encoded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(`eps_cond`, `eps_uncond`) of one window from one UNet pass over the window twice, conditional rows
        first: the reference bank and the control residuals reach only those rows, so each half computes what
        its own call would. A batch of twice the frames keeps the GPU busier than two passes (the README's speed
        table has the figures), for the memory of the larger batch."""
        # One tensor for both branches is passed once. Compared by identity, before any dtype conversion makes two
        # objects of it: a comparison of values would synchronise with the GPU (and cannot be graph-recorded).
        shared_context = context is uncond_context
        x, context, uncond_context, global_hint, local_hint = self._inputs(x, context, uncond_context, global_hint,
                                                                           local_hint)
        frames = x.shape[0]
        ts = self._timesteps(t, frames)
        control = self._control_residuals(x, ts, context, global_hint, local_hint, global_strength, local_strength,
                                       hints_encoded)
        if shared_context and context.shape[0] == 1:
            both_contexts = context  # broadcast over all rows by the attention, no copy per row
        else:
            both_contexts = torch.cat([c.expand(frames, -1, -1) if c.shape[0] == 1 else c
                                       for c in (context, uncond_context)])
        both = torch.cat([x, x]).contiguous(memory_format=self.memory_format)
        eps = self.unet(both, torch.cat([ts, ts]), both_contexts, bank=bank, control=control,
                        num_frames=num_frames or frames, conditional_rows=frames).float()
        return eps[:frames], eps[frames:]

    def eps_uncond(self, x: torch.Tensor, t, context: torch.Tensor, num_frames: Optional[int] = None) -> torch.Tensor:
        """Noise prediction of the UNet and motion modules alone: no reference attention, no control."""
        x, context = self._inputs(x, context)
        return self.unet(x, self._timesteps(t, x.shape[0]), context, num_frames=num_frames).float()

    # ---- latent space -----------------------------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
                      sample: bool = True, chunk: int = 16) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> latents scaled by the VAE scale factor (float32).

        sample=True draws from the posterior as the official code does for the reference; False takes its mean.
        """
        (images,) = self._inputs(images)
        mean, logvar = self.vae.encode_chunked(images, chunk)
        mean, logvar = mean.float(), logvar.float()
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device)
            mean = mean + torch.exp(0.5 * logvar) * noise.to(mean.device)
        return mean * self.config.vae.scale_factor

    def decode_latents(self, latents: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Scaled latents (N, 4, h, w) -> images (N, 3, 8h, 8w), about [-1, 1], not clamped (float32)."""
        (z,) = self._inputs(latents / self.config.vae.scale_factor)
        return self.vae.decode_chunked(z, chunk).float()

    # ---- text -------------------------------------------------------------------------------------------------

    def empty_prompt_context(self) -> torch.Tensor:
        """CLIP("") last hidden state (1, 77, C), as both official branches use; computed once and cached."""
        if self.text_encoder is None:
            raise MissingTextEncoderError(
                "this X-Portrait checkpoint has no CLIP text encoder weights (cond_stage_model.*), so the empty-prompt "
                "conditioning cannot be computed: pass conditioning explicitly (e.g. CLIP Text Encode with an SD1.5 "
                "CLIP on an empty prompt) or use the full released checkpoint"
            )
        if self._empty_prompt is None:
            with torch.no_grad():
                self._empty_prompt = encode_empty_prompt(self.text_encoder).float().cpu()
        return self._empty_prompt.to(device=self.device, dtype=self.dtype)
