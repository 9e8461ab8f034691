"""Reference preparation: from an arbitrary photo to the square model input, remembering where it came from.

The official code stretches the whole reference to 512x512 (mode "resize" here). For photos that are not tight
portraits, mode "crop" finds the face and takes a square around it (margin set by the user), so the face fills the
frame the way the model was trained on; `crop_box` records the square so `paste_back` can return full frames.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..media.image_formats import as_frame_batch, as_rgb_float, check_resolution, resize_image
import cv2

from .landmarks import (
    LARGEST_FIRST,
    Face,
    FaceBackend,
    NoFaceFoundError,
    detect_faces,
    order_faces,
    pick_face,
)

CROP = "crop"
RESIZE = "resize"
MODES = (CROP, RESIZE)
DETECT_MAX_SIDE = 1024  # HOG cost grows with area; big photos are searched on a copy this size
# The 68 landmarks stop at the brows; shifting the square up by this fraction of the landmark box centres the head
# (forehead and hair) rather than the brow-to-chin region. On the sample portrait it reproduces its own framing.
HEADROOM = 0.2


@dataclass(eq=False)
class PreparedReference:
    """A reference ready for the model, and the way back to the source photo.

    image: float32 (R, R, 3) in [0, 1], the model input.
    crop_box: x0, y0, x1, y1 in source pixels (end exclusive), inside the source; square in mode "crop", the whole
        source in mode "resize".
    source_size: (height, width) of the source.
    source_image: float32 (H, W, 3) in [0, 1], the source as RGB (alpha dropped), for paste-back.
    face: the chosen face in source pixel coordinates (None only in mode "resize" when no face was found).
    faces: every face found in the source, numbered as `face_order` counts them (the chosen one among them).
    """

    image: np.ndarray
    crop_box: tuple[int, int, int, int]
    source_size: tuple[int, int]
    source_image: np.ndarray
    face: Face | None
    resolution: int
    mode: str
    faces: tuple = ()

    @property
    def landmarks(self) -> np.ndarray | None:
        """float32 (68, 2) in source pixels, or None."""
        return None if self.face is None else self.face.landmarks

    @property
    def landmarks_in_crop(self) -> np.ndarray | None:
        """float32 (68, 2) in the pixels of `image` (R x R), or None."""
        if self.face is None:
            return None
        x0, y0, x1, y1 = self.crop_box
        scale = np.array([self.resolution / (x1 - x0), self.resolution / (y1 - y0)], np.float32)
        return ((self.face.landmarks - np.array([x0, y0], np.float32)) * scale).astype(np.float32)


def square_crop_box(face: Face, image_size: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 of a square around the face: side = landmark box's larger side * (1 + 2 * margin).

    The square is moved inside the image where it would cross a border, and shrunk to the image's shorter side
    when larger, so the crop never needs invented pixels.
    """
    height, width = image_size
    lx0, ly0, lx1, ly1 = (float(v) for v in face.landmark_box)
    size = max(lx1 - lx0, ly1 - ly0, 1.0)
    side = int(round(size * (1.0 + 2.0 * margin)))
    side = max(1, min(side, height, width))
    cx = (lx0 + lx1) * 0.5
    cy = (ly0 + ly1) * 0.5 - HEADROOM * size
    x0 = int(np.clip(round(cx - side / 2), 0, width - side))
    y0 = int(np.clip(round(cy - side / 2), 0, height - side))
    return x0, y0, x0 + side, y0 + side


def prepare_reference(
    image: np.ndarray,
    resolution: int = 512,
    mode: str = CROP,
    margin: float = 0.5,
    backend: FaceBackend | None = None,
    where: str = "the reference image",
    face_index: int = 0,
    face_order: str = LARGEST_FIRST,
) -> PreparedReference:
    """Detect the face, crop a square around it (mode "crop") or take the whole image (mode "resize"), resize.

    image: (H, W), (H, W, 1|3|4), uint8 or float in [0, 1], any size. margin: fraction of the face size added on
    each side (0.5: the square is twice the face). face_index / face_order: which face of a photo with several
    (0 = the first in that order; default the largest). Mode "crop" raises NoFaceFoundError (naming `where`) when
    the photo has no face; mode "resize" works without one, as the official code does.
    """
    resolution = check_resolution(resolution)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be >= 0 (a fraction of the face size), got {margin}")
    source = as_rgb_float(image, where)
    height, width = source.shape[:2]
    faces = order_faces(detect_faces(source, backend, max_side=DETECT_MAX_SIDE), face_order)
    if mode == CROP:
        if not faces:
            raise NoFaceFoundError(where, f"(searched the whole {width}x{height} image)",
                                   "Mode 'resize' needs no face: it stretches the whole image, as the official demo "
                                   "does.")
        face = pick_face(faces, face_index, face_order, where)
        box = square_crop_box(face, (height, width), margin)
    else:
        face = pick_face(faces, face_index, face_order, where) if faces else None
        box = (0, 0, width, height)
    x0, y0, x1, y1 = box
    model_input = resize_image(source[y0:y1, x0:x1], resolution, resolution)
    return PreparedReference(
        image=np.ascontiguousarray(model_input, dtype=np.float32),
        crop_box=box,
        source_size=(height, width),
        source_image=source,
        face=face,
        resolution=resolution,
        mode=mode,
        faces=tuple(faces),
    )


def prepare_references(
    images: np.ndarray | Sequence[np.ndarray],
    resolution: int = 512,
    mode: str = CROP,
    margin: float = 0.5,
    backend: FaceBackend | None = None,
    face_index: int = 0,
    face_order: str = LARGEST_FIRST,
) -> list[PreparedReference]:
    """`prepare_reference` for each image of a batch ((B, H, W, C) array or a list of images of any sizes).

    Raises ValueError on an empty batch and NoFaceFoundError naming the image (counted from 1, as users count;
    mode "crop").
    """
    batch = as_frame_batch(images, "reference images")
    return [
        prepare_reference(img, resolution, mode, margin, backend,
                          where="the reference image" if len(batch) == 1 else f"reference image {i + 1} of {len(batch)}",
                          face_index=face_index, face_order=face_order)
        for i, img in enumerate(batch)
    ]


def draw_numbered_faces(image: np.ndarray, faces: Sequence[Face], chosen: Face | None = None) -> np.ndarray:
    """float32 (H, W, 3) copy of `image` with each face's box and its number (0, 1, ... as `face_index` counts
    them); the chosen face in green, the others in yellow. For the user to see which index is which person."""
    # Drawn in 8 bits (OpenCV's text needs them), returned as floats.
    canvas = np.ascontiguousarray(np.round(as_rgb_float(image, "image") * 255.0).clip(0, 255).astype(np.uint8))
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 200))
    for number, face in enumerate(faces):
        x0, y0, x1, y1 = (int(round(float(v))) for v in face.box)
        colour = (30, 230, 50) if face is chosen else (255, 215, 25)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, thickness)
        scale = max(0.4, (y1 - y0) / 120)
        cv2.putText(canvas, str(number), (x0 + thickness, max(y0 - 2 * thickness, int(22 * scale))),
                    cv2.FONT_HERSHEY_SIMPLEX, scale, colour, max(1, thickness), cv2.LINE_AA)
    return canvas.astype(np.float32) / np.float32(255.0)


def stack_references(references: Sequence[PreparedReference]) -> np.ndarray:
    """float32 (B, R, R, 3): the model inputs of several prepared references (ComfyUI IMAGE layout)."""
    if not references:
        raise ValueError("no references to stack (empty batch)")
    sizes = {ref.resolution for ref in references}
    if len(sizes) != 1:
        raise ValueError(f"references were prepared at different resolutions: {sorted(sizes)}")
    return np.stack([ref.image for ref in references])


__all__ = [
    "CROP",
    "RESIZE",
    "NoFaceFoundError",
    "PreparedReference",
    "prepare_reference",
    "prepare_references",
    "square_crop_box",
    "draw_numbered_faces",
    "stack_references",
]
