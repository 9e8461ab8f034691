"""X-Portrait's two predictions of a window, and what they read: the ControlNets' hints and the reference bank.

    conditional     model.eps_cond(x, t, context, bank(t), hints of the window's frames)   reference + both controls
    unconditional   model.eps_uncond(x, t, uncond_context)                                  UNet + motion modules only

`XPortraitBranches` offers each branch at two levels:
  * window callables `cond(x, t, frame_indices)`, `uncond(...)` and `both(...)` (one UNet batch for the two),
    which take the window's frames of the motion hints (`MotionHintFrames`) and the bank of timestep t from
    `banks`: what a host that applies guidance itself asks for (ComfyUI asks for one branch or both, with
    `windows.windowed_eps` over the video), and what `GuidedDenoiser` combines;
  * the same computations on explicit inputs, `eps_cond(x, t, global_hint, local_hint, bank)`, `eps_uncond(x, t)`
    and `eps_branches(...)`: what CUDA graphs record (fast/cuda_graphs.py), with t a device tensor.

The reference net depends only on the timestep and the text (the reference latents are not noised: official
`wonoise`), so `ReferenceBanks` computes a bank once per timestep, on the R references themselves (batch R), and
every window of that step reads it; the official code ran it on one copy of the reference per frame of every
window. Other bank sources replace it as `banks`: every timestep's bank computed before sampling in low-VRAM mode
(fast/offload.py), or the banks of several timesteps from one call where no CUDA graphs replay the reference net
(batched_banks.py, the default there).

Timesteps: an int in the X-Portrait Sampler; a float (fractional, as a host's sigma schedule gives) or a tensor
of one value, or one per frame, works too. Every frame of a call shares the timestep; banks are keyed by its value.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..model.reference_bank import ReferenceBank
from ..model.xportrait import XPortrait
from . import pinned_hints

# The ControlNets' hint encoders depend on the hint alone, so their features are computed once per video and kept
# on the model's device while both together fit in this budget: that saves both encoders at every window and step,
# and the hints' copies to the device (benchmarks/NOTES.md has the figures). Longer videos keep their hint images
# in pinned host memory, and each window's frames are copied over and encoded as they are denoised, so device
# memory does not grow with length.
RESIDENT_HINT_FEATURE_BYTES = 512 * 2**20


def resident_hint_bytes(num_frames: int, resolution: int, dtype: torch.dtype, model_channels: int,
                        num_hints: int = 2) -> int:
    """Device bytes of a video's hint features while sampling, or 0 when they are too large and the hint images
    stay in host memory instead."""
    features = num_hints * num_frames * model_channels * (resolution // 8) ** 2 * dtype.itemsize
    return features if features <= RESIDENT_HINT_FEATURE_BYTES else 0


def timestep_key(t) -> int | float:
    """A call's timestep as a python number, to key banks by (an int stays an int). A tensor gives its first value:
    every frame of a call shares the timestep. Reading a CUDA tensor's value waits for the GPU."""
    if isinstance(t, torch.Tensor):
        return t.reshape(-1)[0].item()
    return t


class MotionHintFrames:
    """A video's motion hints, ready for sampling, served a window's frames at a time (`frames`).

    global_hint / local_hint: (F, 3, H, W) in [-1, 1] (None, or a strength of 0, leaves that ControlNet out).
    Where they fit (`resident_hint_bytes`), the ControlNets' hint features are computed here, once, on the model's
    device (`encoded`); otherwise the images stay on the host (pinned on a GPU machine) and each window's frames
    are encoded when it is denoised.
    """

    def __init__(self, model: XPortrait, global_hint: Optional[torch.Tensor] = None,
                 local_hint: Optional[torch.Tensor] = None, global_strength: float = 1.0, local_strength: float = 1.0):
        for name, hint in (("global_hint", global_hint), ("local_hint", local_hint)):
            if hint is not None and hint.ndim != 4:
                raise ValueError(f"{name} must be (frames, 3, H, W), got {tuple(hint.shape)}")
        if global_hint is not None and local_hint is not None and len(global_hint) != len(local_hint):
            raise ValueError(f"global_hint has {len(global_hint)} frames but local_hint has {len(local_hint)}")
        self.global_strength = float(global_strength)
        self.local_strength = float(local_strength)
        # A hint whose ControlNet is off (strength 0) is never read.
        global_hint = global_hint if self.global_strength != 0 else None
        local_hint = local_hint if self.local_strength != 0 else None
        shown = [h for h in (global_hint, local_hint) if h is not None]
        self.encoded = bool(shown) and resident_hint_bytes(
            len(shown[0]), shown[0].shape[-1], model.dtype, model.config.unet.model_channels, len(shown)) > 0
        if self.encoded:
            # Whole-video hint features in place of the images, on the device: windows slice them like images.
            global_hint, local_hint = model.encode_motion_hints(global_hint, local_hint)
        elif model.device.type == "cuda" and pinned_hints.page_locked_allowed():
            # Pinned, so each window's frames go to the GPU without stalling the host.
            global_hint, local_hint = (h.pin_memory() if h is not None and h.device.type == "cpu" else h
                                       for h in (global_hint, local_hint))
        self.global_hint, self.local_hint = global_hint, local_hint

    @property
    def num_frames(self) -> Optional[int]:
        hint = self.global_hint if self.global_hint is not None else self.local_hint
        return None if hint is None else len(hint)

    def frames(self, frame_indices: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(global, local) hints of the frames `frame_indices` (a CPU int64 tensor)."""
        return self._frames(self.global_hint, frame_indices), self._frames(self.local_hint, frame_indices)

    @staticmethod
    def _frames(hint: Optional[torch.Tensor], frame_indices: torch.Tensor) -> Optional[torch.Tensor]:
        if hint is None:
            return None
        # Windows are runs of consecutive frames, wrapping round the end of the video: slice them, so a
        # device-resident hint needs no index tensor copied to the device (a stream sync from pageable memory).
        first, count, total = int(frame_indices[0]), len(frame_indices), len(hint)
        if count <= total and torch.equal(frame_indices, (torch.arange(count) + first) % total):
            end = first + count
            return hint[first:end] if end <= total else torch.cat([hint[first:], hint[: end - total]])
        return hint.index_select(0, frame_indices.to(hint.device))


class ReferenceBanks:
    """The reference net's bank at a timestep, kept for the last timestep asked (every window of a step reads it).

    reference_latents: (R, 4, h, w) scaled, not noised; several references are appended in order.
    context: (1, 77, C) the conditional branch's text conditioning, which the reference net reads too (official
        `cond_txt_void`).
    """

    def __init__(self, model: XPortrait, reference_latents: torch.Tensor, context: torch.Tensor):
        if reference_latents.ndim == 3:
            reference_latents = reference_latents[None]
        if reference_latents.ndim != 4 or reference_latents.shape[0] < 1:
            raise ValueError(f"reference_latents must be (R, 4, h, w), got {tuple(reference_latents.shape)}")
        self.model = model
        # On the model's device from the start: CUDA graphs read them in place, and a host copy cannot be recorded.
        self.reference_latents = reference_latents.to(model.device)
        self.context = context
        self._t = None
        self._bank: Optional[ReferenceBank] = None

    def compute(self, t) -> ReferenceBank:
        """A fresh bank at timestep t (an int, a float, or a tensor: a device tensor while graphs record)."""
        if isinstance(t, torch.Tensor) and t.numel() > 1:
            t = t.reshape(-1)[:1]
        return self.model.reference_bank(self.reference_latents, t, self.context)

    def __call__(self, t) -> ReferenceBank:
        """The bank of timestep t: computed on the first window of each step, reused by the others."""
        key = timestep_key(t)
        if self._t != key or self._bank is None:
            self._bank = None  # free the previous step's bank before building the next
            self._bank = self.compute(t)
            self._t = key
        return self._bank

    def release(self) -> None:
        self._bank = self._t = None


class XPortraitBranches:
    """The conditional and unconditional predictions of X-Portrait for a window.

    reference_latents, global_hint / local_hint and the strengths: as `ReferenceBanks` and `MotionHintFrames`.
    context: (1, 77, C) text conditioning of the conditional branch and the reference net; None takes the model's
        empty-prompt context (which needs CLIP weights in the checkpoint).
    uncond_context: (1, 77, C) of the unconditional branch; None leaves that branch out (asking for it raises).
        The same values as `context` are shared as one tensor, which the batched pass then broadcasts.
    """

    def __init__(self, model: XPortrait, reference_latents: torch.Tensor, *,
                 global_hint: Optional[torch.Tensor] = None, local_hint: Optional[torch.Tensor] = None,
                 context: Optional[torch.Tensor] = None, uncond_context: Optional[torch.Tensor] = None,
                 global_strength: float = 1.0, local_strength: float = 1.0):
        self.model = model
        placed = {"device": model.device, "dtype": model.dtype}
        self.context = (context if context is not None else model.empty_prompt_context()).to(**placed)
        if uncond_context is not None:
            uncond_context = uncond_context.to(**placed)
            if uncond_context.shape == self.context.shape and torch.equal(uncond_context, self.context):
                # One context for both branches (the official empty prompt): the batched pass then shares it.
                uncond_context = self.context
        self.uncond_context = uncond_context
        self.banks = ReferenceBanks(model, reference_latents, self.context)
        self.motion_hints = MotionHintFrames(model, global_hint, local_hint, global_strength, local_strength)

    # ---- on explicit inputs (t an int, or a device tensor while graphs record) ----------------------------------

    def _control(self, global_hint, local_hint) -> dict:
        return dict(global_hint=global_hint, local_hint=local_hint, global_strength=self.motion_hints.global_strength,
                    local_strength=self.motion_hints.local_strength, hints_encoded=self.motion_hints.encoded)

    def eps_cond(self, x: torch.Tensor, t, global_hint: Optional[torch.Tensor], local_hint: Optional[torch.Tensor],
                 bank: ReferenceBank) -> torch.Tensor:
        """The conditional eps of one window (float32): reference bank and both ControlNets."""
        return self.model.eps_cond(x, t, self.context, bank, **self._control(global_hint, local_hint)).float()

    def eps_uncond(self, x: torch.Tensor, t) -> torch.Tensor:
        """The unconditional eps of one window (float32): UNet and motion modules alone."""
        return self.model.eps_uncond(x, t, self._uncond_context()).float()

    def eps_branches(self, x: torch.Tensor, t, global_hint: Optional[torch.Tensor],
                     local_hint: Optional[torch.Tensor], bank: ReferenceBank) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) eps of one window from one UNet pass over the window twice."""
        return self.model.eps_branches(x, t, self.context, self._uncond_context(), bank,
                                       **self._control(global_hint, local_hint))

    def _uncond_context(self) -> torch.Tensor:
        if self.uncond_context is None:
            raise ValueError("these branches were built without an unconditional context (uncond_context=None)")
        return self.uncond_context

    # ---- window callables: denoise(x_window, t, frame_indices) ---------------------------------------------------

    def cond(self, x: torch.Tensor, t, frame_indices: torch.Tensor) -> torch.Tensor:
        """The conditional eps of the window of frames `frame_indices` at timestep t."""
        return self.eps_cond(x, t, *self.motion_hints.frames(frame_indices), self.banks(t))

    def uncond(self, x: torch.Tensor, t, frame_indices: torch.Tensor) -> torch.Tensor:
        """The unconditional eps of a window (the frames' positions do not enter it)."""
        return self.eps_uncond(x, t)

    def both(self, x: torch.Tensor, t, frame_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) eps of a window, in one UNet batch."""
        return self.eps_branches(x, t, *self.motion_hints.frames(frame_indices), self.banks(t))

    def release(self) -> None:
        """Drop the cached bank (call when sampling ends or is cancelled)."""
        self.banks.release()
