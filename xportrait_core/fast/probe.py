"""Probing an optional kernel once per (device type, dtype) before the dispatch trusts it.

Triton can be installed yet unable to build its launcher (no C compiler, say), and a kernel can build yet compute
wrong values on a Triton or GPU it was never run on: each of the pack's kernels (frame attention, GroupNorm,
LayerNorm, GEGLU) is run once on fixed values and compared with PyTorch's result before it is used, and the answer
is kept.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("xportrait")


def probed_once(results: dict, kernel: str, reference: str, device: torch.device, dtype: torch.dtype,
                agrees: Callable[[], bool]) -> bool:
    """Whether `agrees()` (run the kernel, compare with `reference`) held for this device type and dtype, asked once
    and remembered in `results`. A disagreement or an exception is logged, once, and the kernel is not used."""
    key = (device.type, dtype)
    if key not in results:
        works = False
        try:
            works = bool(agrees())
            if not works:
                log.warning("X-Portrait %s kernel disagrees with %s on %s/%s: not used", kernel, reference,
                            device.type, dtype)
        except Exception as exc:  # e.g. Triton without a C compiler to build its launcher
            log.warning("X-Portrait %s kernel cannot run on %s/%s (%s: %s): using %s instead", kernel, device.type,
                        dtype, type(exc).__name__, exc, reference)
        results[key] = works
    return results[key]
