"""Motion hints from a driving video, as the official preprocessing builds them.

Official semantics (core/test_xportrait.py), reproduced at any resolution R that is a multiple of 64:
- Landmarks are detected on 256x256 copies of each image (the reference, each driving frame, each aligned frame).
- Best frame: the driving frame whose 68 landmarks are closest to the reference's (sum of absolute differences at
  256), unless given; -2 disables alignment.
- Alignment: for the reference and the best frame, a box = landmark centroid +- half the landmark extent (the
  centroid, not the extent's middle: an official quirk kept here); the affine through three of its corners
  (cv2.getAffineTransform, coordinates scaled by R/256; the official's x2 is that at R = 512) warps every driving
  frame (bilinear, black outside), so the driving face sits where the reference's face is.
- Global hint: each aligned frame in [-1, 1].
- Local hint: on each aligned frame, the centres of landmarks 43:48, 37:42 and 49:68 (the official slices, which
  skip points 36, 42 and 48), rounded and clipped to [32, 223] at 256, scaled to R; the (R/4)^2 box (half size R//8)
  around each copied from the aligned frame, -1 elsewhere. A frame with no face gets an all -1 local hint.

Departures, each to the user's benefit and named here: driving frames are resized with cv2 (INTER_AREA when
shrinking, bilinear when growing) instead of skimage's anti-aliased bilinear; an explicit best_frame is checked
against the number of frames (the official compares it with the reference image's height); with
`track_missed_faces` a frame where the detector misses gets the face found near the previous frame's box with a
relaxed detector threshold (dlib backend), instead of an all -1 local hint; each such frame is named in `warnings`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..media.image_formats import (
    as_frame_batch,
    as_rgb_float,
    check_resolution,
    resize_image,
    to_uint8,
)
from .landmarks import BoxAwareFaceBackend, Face, FaceBackend, default_face_backend

logger = logging.getLogger(__name__)

LANDMARK_RESOLUTION = 256
LOCAL_REGIONS = (slice(43, 48), slice(37, 42), slice(49, 68))  # one eye, the other eye, the mouth (official)
LOCAL_REGION_NAMES = ("eye 43:48", "eye 37:42", "mouth 49:68")
CENTER_CLIP = 32  # at 256: centres stay in [32, 223], so every box lies inside the frame
BEST_FRAME_AUTO = -1
NO_ALIGNMENT = -2


@dataclass(eq=False)
class MotionHints:
    """The control inputs for the global and local motion ControlNets, and what was found on the way.

    global_hint, local_hint: float32 (N, 3, R, R) in [-1, 1].
    best_frame: index of the frame aligned onto the reference; None when no alignment was done.
    affine: float64 (2, 3) mapping driving pixels at R to reference pixels at R (cv2.warpAffine convention); None
        when no alignment was done.
    faces_found: bool (N,): a face was found on the frame the local hint is built from (else that hint is all -1).
    tracked: bool (N,): that face came from the relaxed search near the previous frame's box.
    local_boxes: int32 (N, 3, 4): x0, y0, x1, y1 (end exclusive, at R) of the boxes for eye 43:48, eye 37:42 and
        mouth 49:68; -1 where no face.
    aligned_faces: per frame, the face found on the aligned frame, in R pixel coordinates, or None.
    reference_face: the reference's face in R pixel coordinates, or None.
    warnings: human-readable notes (missing faces with frame indices, fallbacks).
    """

    global_hint: np.ndarray
    local_hint: np.ndarray
    best_frame: int | None
    affine: np.ndarray | None
    faces_found: np.ndarray
    tracked: np.ndarray
    local_boxes: np.ndarray
    aligned_faces: list[Face | None]
    reference_face: Face | None
    resolution: int
    warnings: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(self.global_hint.shape[0])


def _to_landmark_copy(image01: np.ndarray) -> np.ndarray:
    """uint8 256x256 copy for landmark detection (the official: img_as_ubyte(resize(x, (256, 256))))."""
    return to_uint8(resize_image(image01, LANDMARK_RESOLUTION, LANDMARK_RESOLUTION))


def _find_in_sequence(
    backend: FaceBackend, image: np.ndarray, previous: Face | None, track: bool
) -> Face | None:
    faces = backend.detect(image)
    if faces:
        return faces[0]
    if track and previous is not None and isinstance(backend, BoxAwareFaceBackend):
        return backend.detect_near(image, previous.box)
    return None


def alignment_box_corners(landmarks: np.ndarray) -> np.ndarray:
    """float32 (4, 2): the official box corners, centroid +- half extent: top-left, top-right, bottom-left, bottom-right."""
    landmarks = np.asarray(landmarks, np.float64)
    center = landmarks.mean(axis=0)
    half = (landmarks.max(axis=0) - landmarks.min(axis=0)) * 0.5
    signs = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]], np.float64)
    return (center + signs * half).astype(np.float32)


def alignment_affine(reference_landmarks: np.ndarray, driving_landmarks: np.ndarray, scale: float) -> np.ndarray:
    """float64 (2, 3) moving the driving landmark box onto the reference's; landmarks at 256, result at 256*scale."""
    src = alignment_box_corners(reference_landmarks) * np.float32(scale)
    dst = alignment_box_corners(driving_landmarks) * np.float32(scale)
    return cv2.getAffineTransform(dst[:3], src[:3])


def best_matching_frame(
    reference_landmarks: np.ndarray, driving_landmarks: Sequence[np.ndarray | None]
) -> int | None:
    """Index of the frame whose landmarks are closest to the reference's (sum of |difference|); first on ties.

    Frames without landmarks are skipped (the official scores them against zeros, which never wins in practice).
    None when no frame has landmarks.
    """
    reference_landmarks = np.asarray(reference_landmarks, np.float64)
    best, best_diff = None, np.inf
    for index, landmarks in enumerate(driving_landmarks):
        if landmarks is None:
            continue
        diff = float(np.abs(reference_landmarks - np.asarray(landmarks, np.float64)).sum())
        if diff < best_diff:
            best, best_diff = index, diff
    return best


def local_hint_boxes(landmarks_256: np.ndarray, resolution: int) -> np.ndarray:
    """int32 (3, 4) x0, y0, x1, y1 at `resolution` of the eye, eye and mouth boxes, from landmarks at 256."""
    half = resolution // 8
    boxes = np.empty((len(LOCAL_REGIONS), 4), np.int32)
    high = LANDMARK_RESOLUTION - 1 - CENTER_CLIP
    for row, region in enumerate(LOCAL_REGIONS):
        center = np.clip(np.round(np.mean(landmarks_256[region], axis=0)), CENTER_CLIP, high)
        cx, cy = (center * (resolution / LANDMARK_RESOLUTION)).astype(np.int32)
        boxes[row] = (cx - half, cy - half, cx + half, cy + half)
    return boxes


def _validate_best_frame(best_frame, num_frames: int) -> int:
    if isinstance(best_frame, bool) or not isinstance(best_frame, (int, np.integer)):
        raise TypeError(f"best_frame must be an int, got {type(best_frame).__name__}")
    best_frame = int(best_frame)
    if best_frame < NO_ALIGNMENT:
        raise ValueError(f"best_frame must be -1 (search), -2 (no alignment) or a frame index, got {best_frame}")
    if best_frame >= num_frames:
        raise ValueError(
            f"best_frame {best_frame} is out of range: the driving video has {num_frames} frames "
            f"(use 0..{num_frames - 1}, -1 to search for the frame whose pose matches the reference, -2 for none)"
        )
    return best_frame


def extract_motion(
    driving_frames,
    reference_image: np.ndarray,
    resolution: int = 512,
    best_frame: int = BEST_FRAME_AUTO,
    backend: FaceBackend | None = None,
    track_missed_faces: bool = True,
    progress: Callable[[int, int], None] | None = None,
    hint_dtype=np.float32,
) -> MotionHints:
    """Global and local motion hints for every driving frame, aligned onto the reference's face.

    driving_frames: (N, H, W, C) array or a sequence of (H, W, C) images, float in [0, 1] (ComfyUI IMAGE as numpy)
        or uint8; any size (stretched to R x R as the official does), gray/RGB/RGBA. Or a `media.video_io.
        VideoFrames`, which decodes the file as its frames are asked for in order (from the start again for each
        pass), so a long video is never held whole: only its hints are kept.
    reference_image: the reference as the model sees it (e.g. PreparedReference.image), any size and layout.
    best_frame: -1 search, -2 no alignment, >= 0 that frame.
    progress: called as progress(done, total) while frames are processed.
    hint_dtype: the hints' numpy dtype; float16 halves their memory (the model casts each window to its own
        dtype), rounding the hint images finer than an 8-bit video's steps.
    """
    from ..media.video_io import VideoFrames

    resolution = check_resolution(resolution)
    streamed = isinstance(driving_frames, VideoFrames)  # indexed in order: never listed whole
    frames = driving_frames if streamed else as_frame_batch(driving_frames, "driving frames")
    num_frames = len(frames)
    best_frame = _validate_best_frame(best_frame, num_frames)
    backend = backend or default_face_backend()
    scale = resolution / LANDMARK_RESOLUTION
    notes: list[str] = []

    def warn(message: str) -> None:
        notes.append(message)
        logger.warning(message)

    def frame01(index: int) -> np.ndarray:
        return as_rgb_float(frames[index], f"driving frame {index}")

    total_steps = num_frames
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total_steps)

    reference_face = None
    affine = None
    chosen = None
    if best_frame != NO_ALIGNMENT:
        reference_256 = _to_landmark_copy(as_rgb_float(reference_image, "reference image"))
        found = backend.detect(reference_256)
        reference_face = found[0] if found else None
        if reference_face is None:
            warn("No face was found in the reference image: the driving frames are not aligned (as the official code does).")
        else:
            if best_frame == BEST_FRAME_AUTO:
                total_steps += num_frames
                driving_landmarks: list[np.ndarray | None] = []
                previous = None
                for index in range(num_frames):
                    face = _find_in_sequence(
                        backend, _to_landmark_copy(frame01(index)), previous, track_missed_faces
                    )
                    driving_landmarks.append(None if face is None else face.landmarks)
                    previous = face or previous
                    step()
                chosen = best_matching_frame(reference_face.landmarks, driving_landmarks)
                if chosen is None:
                    warn("No face was found in any driving frame: the driving frames are not aligned.")
                best_landmarks = None if chosen is None else driving_landmarks[chosen]
            else:
                faces = backend.detect(_to_landmark_copy(frame01(best_frame)))
                best_landmarks = faces[0].landmarks if faces else None
                if best_landmarks is None:
                    warn(f"No face was found in the chosen best frame {best_frame}: the driving frames are not aligned.")
                else:
                    chosen = best_frame
            if chosen is not None:
                affine = alignment_affine(reference_face.landmarks, best_landmarks, scale)
        if reference_face is not None:
            reference_face = reference_face.scaled(scale)

    global_hint = np.empty((num_frames, 3, resolution, resolution), hint_dtype)
    local_hint = np.full((num_frames, 3, resolution, resolution), -1.0, hint_dtype)
    faces_found = np.zeros(num_frames, bool)
    tracked = np.zeros(num_frames, bool)
    local_boxes = np.full((num_frames, len(LOCAL_REGIONS), 4), -1, np.int32)
    aligned_faces: list[Face | None] = []
    previous = None
    for index in range(num_frames):
        aligned = resize_image(frame01(index), resolution, resolution)
        if affine is not None:
            aligned = cv2.warpAffine(aligned, affine, (resolution, resolution))
        signed = aligned.transpose(2, 0, 1) * np.float32(2.0) - np.float32(1.0)
        global_hint[index] = signed

        face = _find_in_sequence(backend, _to_landmark_copy(aligned), previous, track_missed_faces)
        previous = face or previous
        if face is None:
            aligned_faces.append(None)
            warn(f"No face was found in driving frame {index}: its local hint is left empty (all -1).")
        else:
            faces_found[index] = True
            tracked[index] = face.tracked
            if face.tracked:
                warn(f"Driving frame {index}: the detector missed the face; it was recovered near the previous frame's box.")
            boxes = local_hint_boxes(face.landmarks, resolution)
            local_boxes[index] = boxes
            for x0, y0, x1, y1 in boxes:
                local_hint[index, :, y0:y1, x0:x1] = signed[:, y0:y1, x0:x1]
            aligned_faces.append(face.scaled(scale))
        step()

    return MotionHints(
        global_hint=global_hint,
        local_hint=local_hint,
        best_frame=chosen,
        affine=affine,
        faces_found=faces_found,
        tracked=tracked,
        local_boxes=local_boxes,
        aligned_faces=aligned_faces,
        reference_face=reference_face,
        resolution=resolution,
        warnings=notes,
    )
