"""A stand-in for a CUDA tensor where only its metadata is read: the fast paths' `supports` checks can then be
tested on machines without a GPU."""
from __future__ import annotations

import torch


class CudaTensorStandIn:
    is_cuda = True
    device = torch.device("cuda")

    def __init__(self, dtype: torch.dtype = torch.bfloat16, layout: str = "contiguous", dim: int = 4):
        if layout not in ("contiguous", "channels_last", "strided"):
            raise ValueError(f"unknown layout {layout!r}")
        self.dtype, self._layout, self._dim = dtype, layout, dim

    def dim(self) -> int:
        return self._dim

    def is_contiguous(self, memory_format=torch.contiguous_format) -> bool:
        wanted = "channels_last" if memory_format == torch.channels_last else "contiguous"
        return self._layout == wanted
