"""Overlapping frame windows: which frames each model call sees, and the per-frame average of their predictions.

The motion modules see a fixed number of frames at a time, so a longer video is denoised window by window, as the
official `DDIMSampler_ReferenceOnly` does (W = window, O = overlap, F = number of frames):

  * F > W: a start offset is drawn in [0, F) per step, windows start at `range(offset, offset + F - O, W - O)`,
    each takes frames `arange(start, start + W) % F` (the last one wraps round to the first frames), and eps is
    averaged over the windows covering each frame. O = 0 tiles the video with non-overlapping windows from the
    drawn offset (the official code would run all F frames as one window, which the motion modules cannot do
    beyond their positional table); the wrapped last window then covers a few frames twice.
  * F <= W: one window of all F frames (the window shrinks to F: the motion modules take any length up to their
    positional table). With O > 0 its start is still drawn, so the frames are rotated as the official code rotates
    a 16-frame video with overlap; with O = 0 no offset is drawn and the frames run in order (official).

`windowed_eps` runs a window denoiser over one step's windows and averages per frame. It knows nothing of the
model or the schedule: the DDIM sampler (sampler.py) calls it once per step, and a host sampler that asks for the
whole video's eps at some timestep (ComfyUI's KSampler) can call it the same way.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional, Protocol, Sequence

import torch

# denoise_window(x_window (W, C, h, w), t, frame_indices (W,) CPU int64) -> eps_window (W, C, h, w)
WindowDenoiser = Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor]


def effective_window(num_frames: int, window: int, overlap: int) -> tuple[int, bool]:
    """(window length actually used, whether a start offset is drawn each step) for `num_frames` frames."""
    if num_frames < 1:
        raise ValueError(f"need at least one frame, got {num_frames}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if num_frames <= window:
        return num_frames, overlap > 0
    if overlap >= window:
        raise ValueError(f"overlap ({overlap}) must be smaller than the window ({window})")
    return window, True


def window_indices(num_frames: int, window: int, overlap: int, offset: int = 0) -> list[torch.Tensor]:
    """The frame indices (CPU int64) of each window of one step, in the order they are denoised."""
    window, uses_offset = effective_window(num_frames, window, overlap)
    if not uses_offset:
        return [torch.arange(num_frames)]
    if not 0 <= offset < num_frames:
        raise ValueError(f"window offset must be in [0, {num_frames}), got {offset}")
    if window == num_frames:
        # One rotated window; the official stride formula gives the same single start.
        starts = [offset]
    else:
        starts = range(offset, offset + num_frames - overlap, window - overlap)
    return [torch.arange(start, start + window) % num_frames for start in starts]


def windows_per_step(num_frames: int, window: int, overlap: int) -> int:
    """How many window calls one step makes (the same for every offset)."""
    window, uses_offset = effective_window(num_frames, window, overlap)
    if not uses_offset or window == num_frames:
        return 1
    return math.ceil((num_frames - overlap) / (window - overlap))


class WindowSpread(Protocol):
    """How one step's windows are spread over several processes (sampling/distributed.py has the one in use).

    Every process runs the same sampler on the same latents and windows; each denoises `share(windows)` and
    `combine` sums every process's per-frame sums and counts in place, so all processes get the whole average."""

    def share(self, windows: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """This process's windows of `windows` (the same list on every process)."""

    def combine(self, totals: Optional["WindowTotals"], returns_tuple: bool, x: torch.Tensor,
                num_windows: int) -> tuple["WindowTotals", bool]:
        """Every process's totals added together (in place where this process has some) and whether the denoiser
        returns a tuple; `totals` is None where this process had no window of the step's `num_windows`."""

    def same_everywhere(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as the first process holds it (inputs every process must agree on bit for bit)."""


_SPREAD: ContextVar[Optional[WindowSpread]] = ContextVar("xportrait_window_spread", default=None)


@contextmanager
def spreading_windows(spread: Optional[WindowSpread]) -> Iterator[None]:
    """Within this block every `windowed_eps` (whichever sampler calls it) denoises only `spread.share` of its
    windows and combines the sums with the other processes; None leaves it single-process."""
    token = _SPREAD.set(spread)
    try:
        yield
    finally:
        _SPREAD.reset(token)


def current_spread() -> Optional[WindowSpread]:
    """The spread set by `spreading_windows`, or None in a single process."""
    return _SPREAD.get()


class WindowTotals:
    """Per-frame sums of the eps parts and the number of windows covering each frame, in one flat float32 buffer
    (counts first) so that several processes add theirs together with one collective."""

    def __init__(self, x: torch.Tensor, num_parts: int):
        frames, frame_size = x.shape[0], x[0].numel()
        self.buffer = torch.zeros(frames * (1 + num_parts * frame_size), dtype=torch.float32, device=x.device)
        self.counts = self.buffer[:frames]
        self.sums = [self.buffer[frames + i * frames * frame_size:frames + (i + 1) * frames * frame_size].view(x.shape)
                     for i in range(num_parts)]

    def add(self, idx: torch.Tensor, parts: Sequence[torch.Tensor]) -> None:
        # index_add counts a frame once per occurrence, so any repeated index is averaged correctly.
        for total, eps in zip(self.sums, parts):
            total.index_add_(0, idx, eps.to(torch.float32))
        self.counts.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float32, device=idx.device))

    def averages(self) -> tuple[torch.Tensor, ...]:
        return tuple(total.div_(self.counts.reshape(-1, 1, 1, 1)) for total in self.sums)


def window_sums(denoise_window: WindowDenoiser, x: torch.Tensor, t, windows: Sequence[torch.Tensor], *,
                should_cancel: Optional[Callable[[], bool]] = None,
                after_window: Optional[Callable[[], None]] = None) -> Optional[tuple[Optional[WindowTotals], bool]]:
    """(totals of `windows`, whether the denoiser returns a tuple), or None when cancelled; totals is None when
    `windows` is empty. See `windowed_eps`."""
    totals: Optional[WindowTotals] = None
    returns_tuple = False
    for indices in windows:
        if should_cancel is not None and should_cancel():
            return None
        # Pinned and asynchronous: a pageable host-to-device copy would stall the host on every window.
        idx = indices.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else indices
        out = denoise_window(x.index_select(0, idx), t, indices)
        returns_tuple = isinstance(out, tuple)
        parts = out if returns_tuple else (out,)
        del out
        for eps in parts:
            if eps.shape != (len(indices), *x.shape[1:]):
                raise ValueError(f"denoise returned eps of shape {tuple(eps.shape)} for a window of "
                                 f"{len(indices)} frames of {tuple(x.shape[1:])}")
        if totals is None:
            totals = WindowTotals(x, len(parts))
        totals.add(idx, parts)
        del parts
        if after_window is not None:
            after_window()
    return totals, returns_tuple


def windowed_eps(denoise_window: WindowDenoiser, x: torch.Tensor, t, windows: Sequence[torch.Tensor], *,
                 should_cancel: Optional[Callable[[], bool]] = None,
                 after_window: Optional[Callable[[], None]] = None):
    """eps of every frame of `x` (F, C, h, w) at timestep `t`: `denoise_window` on each window's frames, averaged
    over the windows covering each frame (float32, on x's device). `windows` must cover every frame.

    t goes to `denoise_window` as given (an int in the DDIM sampler; any timestep the denoiser accepts).
    A denoiser that returns a tuple of eps per window (`XPortraitBranches.both`: conditional and unconditional)
    gets the tuple of their averages.
    should_cancel(): checked before every window; when it returns True nothing partial is kept and None is
        returned (the caller raises, with no latents held by this frame).
    after_window(): called after every window (progress); under `spreading_windows` after each of this process's
        windows, then once for each window the other processes ran, when their sums have arrived.
    """
    if not windows:
        raise ValueError("no windows to denoise")
    spread = current_spread()
    mine = windows if spread is None else spread.share(windows)
    result = window_sums(denoise_window, x, t, mine, should_cancel=should_cancel, after_window=after_window)
    if result is None:
        return None
    totals, returns_tuple = result
    if spread is not None:
        # Every process reaches this point once a step, whatever its share: one collective adds all the sums.
        totals, returns_tuple = spread.combine(totals, returns_tuple, x, len(windows))
        if after_window is not None:
            for _ in range(len(windows) - len(mine)):
                after_window()
    averages = totals.averages()
    return averages if returns_tuple else averages[0]
