"""The appearance reference bank.

The reference net is a full UNet run on the reference latent. Every one of its transformer blocks writes the
normed input of its self-attention (the tokens its own self-attention would attend over) into the bank, slot by
slot in block order. The main UNet's transformer block of the same slot appends that entry to its own
self-attention keys and values, so each frame can attend to the reference's appearance at every resolution.

Several references are appended one after another along the token axis, in the order given (the official
`more_image_control` concatenation).
"""
from __future__ import annotations

import torch


class ReferenceBank:
    """Slot-indexed reference tokens; `recording` while the reference net fills it, read-only afterwards."""

    def __init__(self, num_references: int = 1) -> None:
        self.num_references = num_references
        self.entries: list[torch.Tensor] = []
        self.recording = True

    def write(self, slot: int, tokens: torch.Tensor) -> None:
        if slot != len(self.entries):
            raise RuntimeError(f"reference bank written out of order: slot {slot} after {len(self.entries)} entries")
        # The reference net runs on R references x B contexts, reference-major (batch R*B; B is 1 when every frame
        # shares the text context). Each frame sees all references concatenated along tokens in reference order:
        # (R*B, N, C) -> (B, R*N, C).
        r = self.num_references
        b, n, c = tokens.shape[0] // r, tokens.shape[1], tokens.shape[2]
        self.entries.append(tokens.view(r, b, n, c).transpose(0, 1).reshape(b, r * n, c))

    def read(self, slot: int) -> torch.Tensor:
        if slot >= len(self.entries):
            raise RuntimeError(
                f"reference bank has {len(self.entries)} entries but slot {slot} was read: the reference net and the "
                "UNet were built from different configs"
            )
        return self.entries[slot]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ReferenceBank":
        """A finished copy of this bank on `device` (pinned when on the CPU, so copies back to a GPU are
        asynchronous); always new tensors, also on the bank's own device. With non_blocking=True a copy from a GPU
        to the CPU holds its values only once that GPU's stream has been synchronised."""
        device = torch.device(device)
        bank = ReferenceBank(self.num_references)
        for entry in self.entries:
            if device.type == "cpu" and entry.device.type == "cuda":
                pinned = torch.empty(entry.shape, dtype=entry.dtype, pin_memory=True)
                bank.entries.append(pinned.copy_(entry, non_blocking=non_blocking))
            else:
                bank.entries.append(entry.to(device, non_blocking=entry.is_pinned(), copy=True))
        return bank.finish()

    def finish(self) -> "ReferenceBank":
        self.recording = False
        return self
