"""A run's prepared branches carried to the next run of the same job: the ControlNets' encoded hint features and
the reference banks of its planned timesteps.

A ComfyUI user re-queues a workflow with another seed, or another LoRA on the UNet: the next run has the same
reference latents and hints (the same X-Portrait Conditioning output), the same schedule and the same text, and
the networks that read them (the reference net, the ControlNets' hint encoders) have the same weights. Its hint
features and banks would come out as the last run's did, so that run's are handed over instead of being computed
again (a reference-net pass and both hint encoders on every frame, each run).

What must match (`CarriedBranches.fits`), besides the job, which the owner checks: the planned timesteps, whether
the banks are batched, the model's device and dtype, the address of every weight of the reference net and both
ControlNets (a host replaces a weight's tensor when it loads or patches it; nothing patches these in place), and
the texts' values. Only runs of at most one chunk of planned banks carry (`carries`): the few-step runs where
this work is a noticeable part of the run, holding at most `batched_banks.DEFAULT_CHUNK` banks and the hint
features between runs (their sizes: benchmarks/NOTES.md).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..fast.kept_graphs import weight_addresses
from .batched_banks import DEFAULT_CHUNK, BatchedReferenceBanks
from .branches import XPortraitBranches

# The networks whose outputs the carried branches hold: banks (reference net) and hint features (ControlNets).
READ_NETWORKS = ("reference_net", "global_control", "local_control")


def carries(timesteps: Optional[Sequence[int]]) -> bool:
    """Whether a run that planned these timesteps (None: unplanned) carries its branches to the next run."""
    return timesteps is None or len(timesteps) <= DEFAULT_CHUNK


def _key(model, timesteps: Optional[Sequence[int]], batched: bool) -> tuple:
    addresses = tuple(weight_addresses(getattr(model, name)) for name in READ_NETWORKS
                      if getattr(model, name, None) is not None)
    return (id(model), str(model.device), model.dtype, tuple(timesteps) if timesteps else None, batched, addresses)


def _same_text(given: Optional[torch.Tensor], held: Optional[torch.Tensor], model) -> bool:
    if given is None or held is None:
        return given is None and held is None
    if given.shape != held.shape:
        return False
    return torch.equal(given.to(device=model.device, dtype=model.dtype), held)


class CarriedBranches:
    """One run's `XPortraitBranches`, held for the next run (module docstring)."""

    def __init__(self, branches: XPortraitBranches, timesteps: Optional[Sequence[int]]):
        self.branches = branches
        self.batched = isinstance(branches.banks, BatchedReferenceBanks)
        self.key = _key(branches.model, timesteps, self.batched)

    def fits(self, model, timesteps: Optional[Sequence[int]], batched: bool, context: torch.Tensor,
             uncond_context: Optional[torch.Tensor]) -> bool:
        """Whether a run of `model` with these timesteps, bank batching and texts can take these branches."""
        branches = self.branches
        if _key(model, timesteps, batched) != self.key:
            return False
        if not _same_text(context, branches.context, model):
            return False
        # Branches built without an unconditional text cannot serve a run that asks for one (and the reverse is
        # harmless, but keep the construction's sharing rule: one tensor when the values agree).
        return _same_text(uncond_context, branches.uncond_context, model)

    def release(self) -> None:
        """Drop the banks. (The hint features go with the branches object, which kept graphs may still hold as
        the run they were recorded for.)"""
        self.branches.release()
