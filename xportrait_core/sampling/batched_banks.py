"""The reference banks of a run's planned timesteps, computed several timesteps at a time in one reference-net call.

The reference latents are not noised (official `wonoise`), so a bank depends only on the timestep and the text:
the banks of several timesteps come from one reference-net pass over a batch of (references x timesteps), in place
of one small pass per step. Without CUDA graphs a batch-1 pass is bound by its kernel launches, so this removes
most of the reference net's time from the run (benchmarks/NOTES.md). It replaces `XPortraitBranches.banks`:

    branches.banks = BatchedReferenceBanks(branches.banks, timesteps)

The banks are computed when the first timestep of a chunk is asked, `chunk` planned timesteps at once, and the
previous chunk's are dropped then, so the device holds at most one chunk of banks. A timestep that was not planned
(a host sampler's intermediate sigma, a step repeated) is computed alone by the per-timestep `ReferenceBanks`.
Under CUDA graphs (fast/cuda_graphs.py) the uncompiled path keeps these banks too, as the graphs' stored source
(`stored`): each chunk is computed eagerly outside the recordings, and every step's bank is copied into the
buffers the window graphs read, so the reference net runs a chunk of timesteps per call there as well instead of
one recorded batch-1 pass a step.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..model.reference_bank import ReferenceBank
from .branches import ReferenceBanks, timestep_key

# A batch of reference-net rows no larger than a 16-frame window's UNet batch, so computing a chunk needs no more
# activation memory than a window call already does; 31 official timesteps take two calls.
DEFAULT_CHUNK = 16


class BatchedReferenceBanks:
    """The banks of `timesteps` (in the order a run asks for them), from `banks`' references and context, computed
    `chunk` timesteps per reference-net call as they are reached; other timesteps come from `banks` itself."""

    def __init__(self, banks: ReferenceBanks, timesteps: Sequence[int] | torch.Tensor, chunk: int = DEFAULT_CHUNK):
        planned = [timestep_key(int(t)) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
        if not planned:
            raise ValueError("need at least one timestep")
        if int(chunk) < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.banks = banks
        self.chunk = int(chunk)
        self.planned = list(dict.fromkeys(planned))  # unique, in order
        self._position = {t: i for i, t in enumerate(self.planned)}
        self._chunk_banks: dict[int, ReferenceBank] = {}

    def __call__(self, t) -> ReferenceBank:
        key = timestep_key(t)
        bank = self._chunk_banks.get(key)
        if bank is not None:
            return bank
        start = self._position.get(key)
        if start is None:
            return self.banks(t)
        self._chunk_banks = {}  # free the previous chunk before computing the next
        part = self.planned[start:start + self.chunk]
        self._chunk_banks = dict(zip(part, _banks_of(self.banks, part)))
        return self._chunk_banks[key]

    @property
    def model(self):
        return self.banks.model

    # The reference latents and text live in the per-timestep banks this computes from; kept graphs
    # (fast/kept_graphs.py) read and replace them through here.
    @property
    def context(self):
        return self.banks.context

    @context.setter
    def context(self, value):
        self.banks.context = value

    @property
    def reference_latents(self):
        return self.banks.reference_latents

    @reference_latents.setter
    def reference_latents(self, value):
        self.banks.reference_latents = value

    @property
    def stored(self) -> "PlannedBanks":
        """These banks as the stored source of CUDA graphs (`GuidanceGraphs(stored_banks=...)`): a mapping
        {timestep: bank} whose banks are computed, a chunk per reference-net call, when first asked."""
        return PlannedBanks(self)

    def compute(self, t) -> ReferenceBank:
        return self.banks.compute(t)

    def release(self) -> None:
        self._chunk_banks = {}
        self.banks.release()


class PlannedBanks:
    """`BatchedReferenceBanks` read as a mapping: every timestep has a bank (unplanned ones computed alone)."""

    def __init__(self, banks: BatchedReferenceBanks):
        self.banks = banks

    def __contains__(self, t) -> bool:
        return True

    def __getitem__(self, t) -> ReferenceBank:
        return self.banks(t)


def _banks_of(banks: ReferenceBanks, timesteps: list) -> list[ReferenceBank]:
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
