"""Which face regions the local motion ControlNet sees: eye and mouth switches, or a painted mask.

The local hint (face_alignment.MotionHints.local_hint) is the aligned frame inside an eye box, the other eye box
and a mouth box, and -1 (black after `*2-1`, the official "nothing here" value) everywhere else. Turning a region
off sets its box to -1, exactly what the hint is where no face was found; a mask blends the hint towards -1 where
it is below 1, so a binary mask keeps or removes pixels exactly. The global hint is never touched.
"""
from __future__ import annotations

import numpy as np

from ..media.image_formats import resize_image

EYE_REGIONS = (0, 1)  # face_alignment.LOCAL_REGIONS order: eye 43:48, eye 37:42, mouth 49:68
MOUTH_REGIONS = (2,)
EMPTY = -1.0
SNAP = 1e-5


def region_keep_mask(local_boxes: np.ndarray, resolution: int, eyes: bool = True, mouth: bool = True) -> np.ndarray:
    """float32 (N, R, R): 1 inside the boxes of the enabled regions, 0 elsewhere.

    local_boxes: int (N, 3, 4) x0, y0, x1, y1 at R (end exclusive), -1 where a frame has no face.
    """
    boxes = np.asarray(local_boxes)
    if boxes.ndim != 3 or boxes.shape[1:] != (3, 4):
        raise ValueError(f"local_boxes must be (frames, 3, 4), got {boxes.shape}")
    regions = (EYE_REGIONS if eyes else ()) + (MOUTH_REGIONS if mouth else ())
    keep = np.zeros((boxes.shape[0], resolution, resolution), np.float32)
    for frame, frame_boxes in enumerate(boxes):
        for region in regions:
            x0, y0, x1, y1 = (int(v) for v in frame_boxes[region])
            if x0 < 0:  # no face on this frame
                continue
            keep[frame, max(y0, 0):y1, max(x0, 0):x1] = 1.0
    return keep


def mask_at_resolution(mask: np.ndarray, num_frames: int, resolution: int) -> np.ndarray:
    """A (B, H, W) mask in [0, 1] (B = 1 for every frame, or one per frame) -> float32 (N, R, R)."""
    mask = np.asarray(mask, np.float32)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[0] == 0:
        raise ValueError(f"the region mask must be (B, H, W), got shape {mask.shape}")
    if mask.shape[0] not in (1, num_frames):
        raise ValueError(f"the region mask has {mask.shape[0]} frames; give 1 (for every frame) or one per driving "
                         f"frame ({num_frames})")
    resized = np.stack([resize_image(np.clip(m, 0.0, 1.0), resolution, resolution) for m in mask])
    # Area resampling of an all-1 (or all-0) region can land a rounding error off; snap it back so that binary
    # masks keep or drop pixels exactly.
    resized = np.where(resized > 1.0 - SNAP, 1.0, np.where(resized < SNAP, 0.0, resized))
    return np.broadcast_to(resized, (num_frames, resolution, resolution)).astype(np.float32)


def restrict_local_hint(local_hint: np.ndarray, local_boxes: np.ndarray, eyes: bool = True, mouth: bool = True,
                        mask: np.ndarray | None = None) -> np.ndarray:
    """The local hint (N, 3, R, R) in [-1, 1] with disabled regions (and, with a mask, unmasked pixels) set to -1.

    Returns the input unchanged (not a copy) when both regions are on and there is no mask.
    """
    local_hint = np.asarray(local_hint, np.float32)
    if local_hint.ndim != 4 or local_hint.shape[1] != 3 or local_hint.shape[2] != local_hint.shape[3]:
        raise ValueError(f"local_hint must be (frames, 3, R, R), got {local_hint.shape}")
    num_frames, resolution = local_hint.shape[0], local_hint.shape[-1]
    if len(local_boxes) != num_frames:
        raise ValueError(f"local_boxes has {len(local_boxes)} frames but local_hint has {num_frames}")
    if eyes and mouth and mask is None:
        return local_hint
    keep = region_keep_mask(local_boxes, resolution, eyes, mouth)
    if mask is not None:
        keep = keep * mask_at_resolution(mask, num_frames, resolution)
    keep = keep[:, None]
    blended = (EMPTY + keep * (local_hint - EMPTY)).astype(np.float32)
    # Exact where the mask is exactly 0 or 1 (blending would round the kept pixels).
    return np.where(keep >= 1.0, local_hint, np.where(keep <= 0.0, np.float32(EMPTY), blended)).astype(np.float32)
