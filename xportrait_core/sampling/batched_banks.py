"""Every timestep's reference bank from one batched reference-net call: a bank source to try, not yet a default.

The reference latents are not noised (official `wonoise`), so a bank depends only on the timestep and the text:
the banks of all of a job's timesteps can be computed before sampling as one reference-net pass over a batch of
(references x timesteps), in place of one small pass per step. That removes the per-step launches of the reference
net, for device memory holding every timestep's bank at once (and the activations of the larger batch while they
are computed; `chunk` bounds that). It replaces `XPortraitBranches.banks` like the low-VRAM banks do:

    branches.banks = BatchedReferenceBanks(branches.banks, timesteps)

Whether it is faster on a GPU is still to be measured (benchmarks/NOTES.md); the samplers do not use it yet.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..model.reference_bank import ReferenceBank
from .branches import ReferenceBanks, timestep_key


class BatchedReferenceBanks:
    """The banks of `timesteps`, computed now from `banks`' references and context in batches of `chunk` timesteps
    (all at once by default) and kept on the model's device; `stored` maps each timestep to its bank."""

    def __init__(self, banks: ReferenceBanks, timesteps: Sequence[int] | torch.Tensor, chunk: Optional[int] = None):
        timesteps = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
        if not timesteps:
            raise ValueError("need at least one timestep")
        chunk = len(timesteps) if chunk is None else int(chunk)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.stored: dict[int, ReferenceBank] = {}
        for start in range(0, len(timesteps), chunk):
            part = timesteps[start:start + chunk]
            for t, bank in zip(part, _banks_of(banks, part)):
                self.stored[t] = bank

    def __call__(self, t) -> ReferenceBank:
        key = timestep_key(t)
        if key not in self.stored:
            raise KeyError(f"no precomputed reference bank for timestep {t}")
        return self.stored[key]

    def release(self) -> None:
        self.stored = {}


def _banks_of(banks: ReferenceBanks, timesteps: list[int]) -> list[ReferenceBank]:
    """One reference-net pass for all `timesteps`, split into one bank per timestep.

    Uses the model's per-frame-context layout: with T contexts, `XPortrait.reference_bank` runs R x T rows,
    reference-major (row r*T + b), and its bank holds row b of every reference at entry row b. Giving row r*T + b
    the timestep timesteps[b] (and every row the same context) makes entry row b the bank of timesteps[b]."""
    model, latents, context = banks.model, banks.reference_latents, banks.context
    count, num_refs = len(timesteps), latents.shape[0]
    if context.shape[0] != 1:
        raise ValueError("batched banks need one text context shared by every frame")
    per_row = torch.tensor(timesteps, dtype=torch.long).repeat(num_refs).to(model.device)
    batched = model.reference_bank(latents, per_row, context.expand(count, -1, -1))
    split = []
    for row in range(count):
        bank = ReferenceBank(batched.num_references)
        bank.entries = [entry[row:row + 1] for entry in batched.entries]
        split.append(bank.finish())
    return split
