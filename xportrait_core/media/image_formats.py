"""Image layouts the face tools accept, and the one resize they all use.

Images arrive from ComfyUI as float32 (H, W, C) in [0, 1] and from files as uint8; photos may be grayscale or carry
an alpha channel. Everything here is plain numpy/cv2 so the face modules stay free of torch.
"""
from __future__ import annotations

import numpy as np


def check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise TypeError(f"resolution must be an int, got {type(resolution).__name__}")
    resolution = int(resolution)
    if resolution < 64 or resolution % 64:
        raise ValueError(f"resolution must be a positive multiple of 64 (e.g. 512), got {resolution}")
    return resolution


def _as_hwc(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ValueError(
            f"{what}: expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{what}: the image is empty (shape {image.shape})")
    channels = image.shape[2]
    if channels in (1, 2):  # gray, gray + alpha
        image = np.repeat(image[:, :, :1], 3, axis=2)
    elif channels == 4:  # alpha is dropped, not composited: the official code does `[..., :3]` as well
        image = image[:, :, :3]
    return image


def as_rgb_float(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Any accepted image -> float32 (H, W, 3) in [0, 1]. uint8 is divided by 255, floats are clipped."""
    image = _as_hwc(image, what)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    if image.dtype == np.uint16:
        return image.astype(np.float32) / np.float32(65535.0)
    if np.issubdtype(image.dtype, np.floating) or image.dtype == np.bool_:
        return np.clip(image.astype(np.float32), 0.0, 1.0)
    raise ValueError(f"{what}: unsupported dtype {image.dtype} (use uint8, uint16 or float in [0, 1])")


def as_rgb_uint8(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Any accepted image -> contiguous uint8 (H, W, 3), rounding floats the way skimage's img_as_ubyte does."""
    image = _as_hwc(image, what)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    return to_uint8(as_rgb_float(image, what))


def to_uint8(image01: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8, rounded to nearest."""
    return np.ascontiguousarray(np.clip(np.rint(np.asarray(image01) * 255.0), 0, 255).astype(np.uint8))


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize to (height, width), stretching if the aspect differs (the official code stretches too).

    The official code uses skimage `resize` (bilinear, Gaussian anti-aliasing when shrinking). cv2.INTER_AREA is
    the anti-aliased equivalent for shrinking; growing uses bilinear (cv2.INTER_LINEAR), skimage's order=1.
    Same size returns the input unchanged.
    """
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    shrinking = width * height < w * h
    import cv2  # noqa: PLC0415 - only resizing needs OpenCV; the sampling path imports this module without it

    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    out = cv2.resize(image, (int(width), int(height)), interpolation=interpolation)
    if out.ndim == 2 and image.ndim == 3:
        out = out[:, :, None]
    return out


def as_frame_batch(frames, what: str = "frames") -> list[np.ndarray] | np.ndarray:
    """A (N, H, W, C) array or a sequence of (H, W, C) images; raises a clear error when it is empty."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise ValueError(f"{what}: expected a batch (N, H, W, C), got shape {frames.shape}")
        if frames.shape[0] == 0:
            raise ValueError(f"{what}: the batch is empty (0 frames)")
        return frames
    frames = list(frames)
    if not frames:
        raise ValueError(f"{what}: the batch is empty (0 frames)")
    return frames
