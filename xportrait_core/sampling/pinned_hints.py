"""Motion hint images in page-locked host memory, kept beside the arrays they copy for the runs that read them again.

Every sampling run copies a video's hint images to the GPU (all at once where their features stay on the device,
a window at a time otherwise). From ordinary (pageable) memory such a copy is staged through a driver buffer and
holds the host while it runs; from page-locked memory it runs at the bus's speed and can overlap the GPU's work.
ComfyUI keeps a node's MOTION and conditioning between queued runs, so a pinned copy made at the first run is
served to every later run of the same hints, until the array it copies is freed. Only hints up to
`KEPT_PINNED_BYTES` each are kept so: page-locked memory is taken from what the system can swap.
"""
from __future__ import annotations

import weakref

import torch

KEPT_PINNED_BYTES = 2**30

# Off where the host application says page-locked memory is not to be used (ComfyUI's --disable-pinned-memory).
_allowed = True

# id(source) -> (a weak reference to the source, what it looked like, the pinned copy); an entry leaves when its
# source is freed (the weak reference's callback), so a new object at the same id never meets a stale copy.
_kept: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def pinned_copy(source, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (the CPU hint made from `source`, a numpy array or tensor the caller keeps between runs) in
    page-locked memory where a CUDA device can read it and it is small enough to keep; otherwise `tensor`.
    The same source, unchanged, gives the same pinned tensor at every call."""
    if (not _allowed or tensor.device.type != "cpu" or tensor.nbytes > KEPT_PINNED_BYTES
            or not torch.cuda.is_available()):
        return tensor
    # A tensor's version counter moves at every in-place change; a numpy array has none (hints are never written
    # after they are made, but a caller's own array could be).
    looks = (tuple(tensor.shape), tensor.dtype, getattr(source, "_version", None))
    entry = _kept.get(id(source))
    if entry is not None and entry[0]() is source and entry[1] == looks:
        return entry[2]
    try:
        pinned = tensor.pin_memory()
    except RuntimeError:  # no page-locked memory to be had: the pageable copy still works
        return tensor
    try:
        key = id(source)
        _kept[key] = (weakref.ref(source, lambda _ref, key=key: _forget(key, _ref)), looks, pinned)
    except TypeError:  # a source that takes no weak reference: pinned for this run only
        pass
    return pinned


def allow_page_locked(allowed: bool) -> None:
    """Whether hint images may be page-locked at all: kept copies here, and a long video's hints pinned for its
    run (sampling/branches.py). Turning it off drops the kept copies."""
    global _allowed
    _allowed = bool(allowed)
    if not _allowed:
        _kept.clear()


def page_locked_allowed() -> bool:
    return _allowed


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _kept.get(key)
    if entry is not None and entry[0] is ref:
        del _kept[key]


def kept_bytes() -> int:
    """Page-locked bytes kept for hints now."""
    return sum(entry[2].nbytes for entry in _kept.values())
