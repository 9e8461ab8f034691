"""Paste-back: put the animated square crops back into the full-resolution reference photo.

The whole crop is animated (head, hair, shoulders move together), so the whole square is pasted, with its weight
ramping from 0 at the square's edge to 1 at `feather` pixels inside. Where the square touches the photo's border
there is nothing to blend with, and the weight stays 1 up to that edge. Outside the square the weight is exactly 0,
and there the result is the reference photo, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..media.image_formats import as_frame_batch, as_rgb_float
from .reference_crop import PreparedReference

DEFAULT_FEATHER_FRACTION = 0.1  # of the crop side, when no feather width is given


@dataclass(eq=False)
class PastedFrames:
    """frames: float32 (N, H, W, 3) in [0, 1], the full photos. mask: float32 (1, H, W) in [0, 1], the weight
    given to the animated crop (ComfyUI MASK layout; the same for every frame)."""

    frames: np.ndarray
    mask: np.ndarray


def feather_width(reference: PreparedReference, feather: int | None) -> int:
    x0, _, x1, _ = reference.crop_box
    if feather is None:
        return max(1, int(round(DEFAULT_FEATHER_FRACTION * (x1 - x0))))
    if isinstance(feather, bool) or int(feather) != feather or feather < 0:
        raise ValueError(f"feather must be a width in pixels >= 0, got {feather!r}")
    return int(feather)


def _edge_ramp(length: int, start: int, end: int, full: int, feather: int) -> np.ndarray:
    """Weights along one axis of the crop [start, end) of an image axis of size `full`."""
    if feather == 0:
        return np.ones(length, np.float32)
    centres = np.arange(length, dtype=np.float32) + np.float32(0.5)
    distance = np.full(length, np.inf, np.float32)
    if start > 0:
        distance = np.minimum(distance, centres)
    if end < full:
        distance = np.minimum(distance, np.float32(length) - centres)
    t = np.clip(distance / np.float32(feather), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)  # smoothstep: no visible kink at either end of the band


def paste_mask(reference: PreparedReference, feather: int | None = None) -> np.ndarray:
    """float32 (H, W) in [0, 1]: the weight of the animated crop in the full photo (0 outside the crop box)."""
    feather = feather_width(reference, feather)
    height, width = reference.source_size
    x0, y0, x1, y1 = reference.crop_box
    mask = np.zeros((height, width), np.float32)
    ramp_x = _edge_ramp(x1 - x0, x0, x1, width, feather)
    ramp_y = _edge_ramp(y1 - y0, y0, y1, height, feather)
    mask[y0:y1, x0:x1] = ramp_y[:, None] * ramp_x[None, :]
    return mask


def _resize_to_crop(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    growing = width * height > w * h
    out = cv2.resize(frame, (width, height), interpolation=cv2.INTER_CUBIC if growing else cv2.INTER_AREA)
    return np.clip(out, 0.0, 1.0) if growing else out  # cubic overshoots at edges


def paste_frame(
    frame: np.ndarray, reference: PreparedReference, mask: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """One animated crop (any square size, uint8 or float [0, 1]) -> float32 (H, W, 3) full photo.

    `mask` is `paste_mask(reference, ...)`, computed once per video (this also suits streaming to a video writer).
    `out`: an optional float32 (H, W, 3) buffer to write into.
    """
    if mask.shape != tuple(reference.source_size):
        raise ValueError(f"mask shape {mask.shape} does not match the reference photo {tuple(reference.source_size)}")
    x0, y0, x1, y1 = reference.crop_box
    crop = _resize_to_crop(as_rgb_float(frame, "animated frame"), x1 - x0, y1 - y0)
    if out is None:
        out = reference.source_image.copy()
    else:
        out[...] = reference.source_image
    region = out[y0:y1, x0:x1]
    weight = mask[y0:y1, x0:x1, None]
    # region + w * (crop - region) leaves region exactly as it was where w == 0
    out[y0:y1, x0:x1] = region + weight * (crop - region)
    return out


def paste_back(frames, reference: PreparedReference, feather: int | None = None) -> PastedFrames:
    """Full-resolution frames: each animated crop pasted into the reference photo with a feathered edge.

    frames: (N, R', R', C) array or a sequence of images, float [0, 1] or uint8 (any size; resized to the crop).
    feather: ramp width in source pixels (None: a tenth of the crop side; 0: a hard edge).
    """
    batch = as_frame_batch(frames, "animated frames")
    mask = paste_mask(reference, feather)
    height, width = reference.source_size
    out = np.empty((len(batch), height, width, 3), np.float32)
    for index, frame in enumerate(batch):
        paste_frame(frame, reference, mask, out=out[index])
    return PastedFrames(frames=out, mask=mask[None])
