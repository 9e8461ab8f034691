"""Classifier-free guidance as the official `controlnet_important` mode: eps = u + s (c - u).

A window call of the X-Portrait Sampler flows one way, outer to inner:

    sample_ddim (sampler.py)                  per step: window offset, then windowed_eps over the step's windows
      windowed_eps (windows.py)               each window's frames -> denoise(x_window, t, frame_indices), averaged
        [GraphedDenoiser (fast/cuda_graphs)]  on CUDA: replays the recorded window work below; eager where it can't
          GuidedDenoiser (here)               the formula: both branches of the window, then u + s (c - u)
            XPortraitBranches (branches.py)   hints of the window's frames + bank of timestep t -> model.eps_*
              banks(t)                        ReferenceBanks (reference net, once per timestep), or banks
                                              computed before sampling for every timestep (fast/offload.py in
                                              low-VRAM mode; batched_banks.py, one batched call)

Nothing below calls back up: the graphs wrap the denoiser and read its banks; the denoiser never knows it is
recorded. A host that applies guidance itself (ComfyUI's KSampler) uses `XPortraitBranches` with `windowed_eps`
and no `GuidedDenoiser`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..model.reference_bank import ReferenceBank
from ..model.xportrait import XPortrait
from .branches import XPortraitBranches


def guided_eps(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: the unconditional eps moved `guidance_scale` times towards the conditional one."""
    return uncond + guidance_scale * (cond - uncond)


class GuidedDenoiser:
    """`denoise(x_window, t, frame_indices) -> guided eps` for `sampler.sample_ddim`, from X-Portrait's branches.

    guidance_scale: s of u + s (c - u). 1 runs the conditional branch alone, 0 the unconditional one alone (no
        reference bank then).
    batch_branches: run both branches' UNet passes as one batch (`XPortraitBranches.eps_branches`): faster, for the
        activation memory of a double batch; False runs them one after the other (low-VRAM mode does).
    """

    def __init__(self, branches: XPortraitBranches, guidance_scale: float = 5.0, batch_branches: bool = True):
        self.branches = branches
        self.guidance_scale = float(guidance_scale)
        self.batch_branches = bool(batch_branches)
        if self.needs_uncond and branches.uncond_context is None:
            raise ValueError(f"guidance scale {self.guidance_scale} needs the unconditional branch, but the branches "
                             "have no uncond_context")

    @classmethod
    def for_model(cls, model: XPortrait, reference_latents: torch.Tensor, *, guidance_scale: float = 5.0,
                  batch_branches: bool = True, context: Optional[torch.Tensor] = None,
                  uncond_context: Optional[torch.Tensor] = None, **branch_args) -> "GuidedDenoiser":
        """The denoiser of `model` on these references: other keyword arguments as `XPortraitBranches`. A missing
        uncond_context is the model's empty-prompt context, asked for only where the scale needs that branch."""
        if guidance_scale == 1.0:
            uncond_context = None
        elif uncond_context is None:
            uncond_context = model.empty_prompt_context()
        branches = XPortraitBranches(model, reference_latents, context=context, uncond_context=uncond_context,
                                     **branch_args)
        return cls(branches, guidance_scale, batch_branches)

    @property
    def needs_cond(self) -> bool:
        return self.guidance_scale != 0.0

    @property
    def needs_uncond(self) -> bool:
        return self.guidance_scale != 1.0

    def window_eps(self, x: torch.Tensor, t, global_hint: Optional[torch.Tensor],
                   local_hint: Optional[torch.Tensor], bank: Optional[ReferenceBank]) -> torch.Tensor:
        """The guided eps of one window from explicit inputs (t an int, or a device tensor while graphs record):
        both branches in one UNet batch, or one after the other, or the one branch a scale of 0 or 1 needs."""
        branches = self.branches
        if not self.needs_cond:
            return branches.eps_uncond(x, t)
        if not self.needs_uncond:
            return branches.eps_cond(x, t, global_hint, local_hint, bank)
        if self.batch_branches:
            cond, uncond = branches.eps_branches(x, t, global_hint, local_hint, bank)
        else:
            uncond = branches.eps_uncond(x, t)
            cond = branches.eps_cond(x, t, global_hint, local_hint, bank)
        return guided_eps(cond, uncond, self.guidance_scale)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t, frame_indices: torch.Tensor) -> torch.Tensor:
        # A scale of 0 reads the unconditional branch alone, which needs no bank.
        bank = self.branches.banks(t) if self.needs_cond else None
        return self.window_eps(x, t, *self.branches.motion_hints.frames(frame_indices), bank)

    def release(self) -> None:
        """Drop the cached reference banks (call when sampling ends or is cancelled)."""
        self.branches.release()
