"""X-Portrait as a plain noise predictor over a whole video, for samplers that are not ours (ComfyUI's KSampler).

A host's sampler asks for eps of every frame at one timestep, for one or both official branches:

    conditional   = model.eps_cond(window, t, context, reference bank, hints)    reference + both ControlNets
    unconditional = model.eps_uncond(window, t, uncond_context)                 UNet + motion modules only

(the official `controlnet_important` mode). The video is cut into windows of `window` frames overlapping by
`overlap`, exactly as `sampler.window_indices` cuts it for our own DDIM, with one start offset drawn per timestep
from a CPU generator seeded by the caller; eps is averaged over the windows covering each frame. Guidance is the
host's: both branches come back separately. When both are asked for the same latents, each window runs them as
one UNet batch (`XPortrait.eps_guided`), as our Sampler does.

The reference latents are not noised (official), so the reference bank depends only on the timestep and the
conditional text: it is computed once per timestep and shared by every window and both calls of that timestep.
The ControlNets' hint features are computed once per video where they fit on the device (guidance.py's rule).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..model.reference_bank import ReferenceBank
from ..model.xportrait import XPortrait
from .guidance import resident_hint_bytes
from .sampler import effective_window, window_indices


@dataclass(frozen=True)
class BranchInput:
    """One branch's request: latents x_t (F, 4, h, w) of the whole video and its text context (1, tokens, C)."""

    latents: torch.Tensor
    conditional: bool
    context: torch.Tensor


class VideoDenoiser:
    """eps of every frame for the requested branches at one integer timestep; see the module docstring.

    reference_latents: (R, 4, h, w) scaled, not noised. global_hint / local_hint: (F, 3, H, W) in [-1, 1]
    (None, or a strength of 0, skips that ControlNet). seed: seeds the window offsets, drawn as our sampler
    draws them (`torch.randint(0, F, (1,))` per timestep), so the same seed gives the same offsets as
    `sample_ddim(generator=torch.Generator().manual_seed(seed))` at eta 0.
    """

    def __init__(self, model: XPortrait, reference_latents: torch.Tensor, *,
                 global_hint: Optional[torch.Tensor] = None, local_hint: Optional[torch.Tensor] = None,
                 global_strength: float = 1.0, local_strength: float = 1.0, window: int = 16, overlap: int = 4,
                 seed: int = 0):
        if reference_latents.ndim != 4:
            raise ValueError(f"reference_latents must be (R, 4, h, w), got {tuple(reference_latents.shape)}")
        self.model = model
        self.reference_latents = reference_latents
        self.global_strength = float(global_strength)
        self.local_strength = float(local_strength)
        self.global_hint = global_hint if global_hint is not None and self.global_strength != 0 else None
        self.local_hint = local_hint if local_hint is not None and self.local_strength != 0 else None
        self.window = int(window)
        self.overlap = int(overlap)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.hints_encoded = False
        self._hints_ready = False
        self._offset_t: Optional[int] = None
        self._offset = 0
        self._bank_key = None
        self._bank: Optional[ReferenceBank] = None

    @property
    def num_frames(self) -> Optional[int]:
        hint = self.global_hint if self.global_hint is not None else self.local_hint
        return None if hint is None else len(hint)

    def release(self) -> None:
        """Drop the cached bank and hint features (the end of a sampling run)."""
        self._bank = self._bank_key = None
        if self.hints_encoded:
            self.global_hint = self.local_hint = None
            self._hints_ready = False

    def _prepare_hints(self) -> None:
        if self._hints_ready:
            return
        model = self.model
        shown = [h for h in (self.global_hint, self.local_hint) if h is not None]
        if shown and resident_hint_bytes(len(shown[0]), shown[0].shape[-1], model.dtype,
                                         model.config.unet.model_channels, len(shown)) > 0:
            self.global_hint, self.local_hint = model.encode_motion_hints(self.global_hint, self.local_hint)
            self.hints_encoded = True
        self._hints_ready = True

    def window_offset(self, t: int, num_frames: int) -> int:
        """The start offset of timestep t's windows: drawn when t differs from the previous call's timestep (the
        conditional and unconditional calls of one step share it)."""
        if self._offset_t != t:
            _, draws = effective_window(num_frames, self.window, self.overlap)
            self._offset = int(torch.randint(0, num_frames, (1,), generator=self.generator).item()) if draws else 0
            self._offset_t = t
        return self._offset

    def reference_bank(self, t: int, context: torch.Tensor) -> ReferenceBank:
        # A host may hand over a new tensor of the same text at every call: compared by value (77 tokens).
        if (self._bank_key is None or self._bank_key[0] != t or self._bank_key[1].shape != context.shape
                or not torch.equal(self._bank_key[1], context)):
            self._bank = None
            self._bank = self.model.reference_bank(self.reference_latents, t, context)
            self._bank_key = (t, context)
        return self._bank

    def _hint_frames(self, hint: Optional[torch.Tensor], indices: torch.Tensor) -> Optional[torch.Tensor]:
        if hint is None:
            return None
        return hint.index_select(0, indices.to(hint.device))

    @torch.no_grad()
    def __call__(self, t: int, branches: Sequence[BranchInput],
                 frame_indices: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
        """eps (float32, like each branch's latents) per branch, in order.

        frame_indices: the latents are already one window, of these frames of the video (a host that cuts the
        windows itself, e.g. ComfyUI's context-window nodes): run that window as it is, with its frames' hints.
        """
        if not branches:
            return []
        num_frames = branches[0].latents.shape[0]
        for branch in branches:
            if branch.latents.shape != branches[0].latents.shape:
                raise ValueError("every branch must hold the same video: got latents of shapes "
                                 f"{[tuple(b.latents.shape) for b in branches]}")
        video_frames = self.num_frames
        if frame_indices is not None:
            frame_indices = torch.as_tensor(list(frame_indices), dtype=torch.int64)
            if len(frame_indices) != num_frames:
                raise ValueError(f"{len(frame_indices)} frame indices for a window of {num_frames} latents")
            if video_frames is not None and (frame_indices.min() < 0 or frame_indices.max() >= video_frames):
                raise ValueError(f"window frames {frame_indices.tolist()} outside the motion's {video_frames} frames")
        elif video_frames is not None and video_frames != num_frames:
            raise ValueError(f"the latents hold {num_frames} frames but the motion has {video_frames}: give the "
                             "sampler one latent per driving frame")
        window = num_frames if frame_indices is not None else min(self.window, num_frames)
        if window > self.model.config.motion.max_frames:
            raise ValueError(f"a window of {window} frames is longer than the motion modules' "
                             f"{self.model.config.motion.max_frames}")
        self._prepare_hints()
        t = int(t)
        if frame_indices is not None:
            plan = [(torch.arange(num_frames), frame_indices)]
        else:
            offset = self.window_offset(t, num_frames)
            plan = [(indices, indices) for indices in window_indices(num_frames, self.window, self.overlap, offset)]
        conditional = [b for b in branches if b.conditional]
        bank = self.reference_bank(t, conditional[0].context) if conditional else None
        # Both branches on the same latents (classifier-free guidance): one UNet batch per window.
        pair = None
        if len(branches) == 2 and branches[0].conditional != branches[1].conditional:
            cond_index = 0 if branches[0].conditional else 1
            if torch.equal(branches[0].latents, branches[1].latents):
                pair = (cond_index, 1 - cond_index)
        device = branches[0].latents.device
        sums = [torch.zeros(b.latents.shape, dtype=torch.float32, device=device) for b in branches]
        counts = torch.zeros(num_frames, dtype=torch.float32, device=device)
        strengths = dict(global_strength=self.global_strength, local_strength=self.local_strength,
                         hints_encoded=self.hints_encoded)
        for positions, frames in plan:
            idx = positions.to(device)
            hints = dict(global_hint=self._hint_frames(self.global_hint, frames),
                         local_hint=self._hint_frames(self.local_hint, frames), **strengths)
            eps = [None] * len(branches)
            if pair is not None:
                cond, uncond = pair
                x = branches[cond].latents.index_select(0, idx)
                eps[cond], eps[uncond] = self.model.eps_guided(x, t, branches[cond].context,
                                                               branches[uncond].context, bank, **hints)
            else:
                for i, branch in enumerate(branches):
                    x = branch.latents.index_select(0, idx)
                    if branch.conditional:
                        eps[i] = self.model.eps_cond(x, t, branch.context, bank, **hints)
                    else:
                        eps[i] = self.model.eps_uncond(x, t, branch.context)
            for total, part in zip(sums, eps):
                total.index_add_(0, idx, part.to(device=device, dtype=torch.float32))
            counts.index_add_(0, idx, torch.ones(len(positions), device=device))
            del eps
        return [total / counts.reshape(-1, 1, 1, 1) for total in sums]
