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
`track_missed_faces` a frame where the detector misses gets the face found near a neighbouring frame's box with a
relaxed detector threshold (dlib backend), instead of an all -1 local hint: the previous frame's, or for frames
before the first detection the next frame's (searching backwards), so a clip whose first frames are hard for the
detector does not lose their hints; such frames are named in `warnings`, grouped.

Several people: `face_index` / `face_order` choose the driving face on the first frame where faces are found (0 =
the largest, as before); every later frame takes the face nearest the chosen one's previous position, so the
same person is followed (on the aligned frames, nearest where the alignment put that person's face).
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
from .landmarks import (
    LARGEST_FIRST,
    BoxAwareFaceBackend,
    Face,
    FaceBackend,
    default_face_backend,
    nearest_face,
    order_faces,
    pick_face,
)

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
    warnings: human-readable notes (missing faces with frame indices, fallbacks), for the user.
    chosen_among: (frame index, faces) where the driving face was chosen by `face_index`: every face found on that
        frame, numbered as `face_order` counts them, in the pixels of the driving frame; None when no frame had one.
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
    chosen_among: tuple[int, list[Face]] | None = None

    @property
    def num_frames(self) -> int:
        return int(self.global_hint.shape[0])


def _to_landmark_copy(image01: np.ndarray) -> np.ndarray:
    """uint8 256x256 copy for landmark detection (the official: img_as_ubyte(resize(x, (256, 256))))."""
    return to_uint8(resize_image(image01, LANDMARK_RESOLUTION, LANDMARK_RESOLUTION))


def _find_in_sequence(
    backend: FaceBackend,
    image: np.ndarray,
    previous: Face | None,
    track: bool,
    choose: Callable[[list[Face], np.ndarray | None], Face],
    anchor: np.ndarray | None = None,
    original: np.ndarray | None = None,
) -> Face | None:
    """The chosen person's face in one frame: nearest `anchor` (a box where it is expected) or the previous face,
    else by the user's index; a relaxed search near the previous face when the detector misses and `track`.

    `original`: the frame before it was stretched to the square `image`; where the detector misses the stretched
    face, it looks on an undistorted copy and maps what it finds onto `image`."""
    faces = backend.detect(image)
    if not faces and original is not None:
        faces = _detect_undistorted(backend, original)
    if faces:
        near = anchor if anchor is not None else (None if previous is None else previous.box)
        return choose(faces, near)
    if track and previous is not None and isinstance(backend, BoxAwareFaceBackend):
        return backend.detect_near(image, previous.box)
    return None


def _detect_undistorted(backend: FaceBackend, frame01: np.ndarray) -> list[Face]:
    """Faces of a non-square frame found on a copy that keeps its aspect ratio (shorter side 256), in the
    coordinates of the 256x256 stretched copy the official code detects on.

    Stretching a 16:9 frame to a square squeezes the face by almost half; the detector often misses such faces
    (a clip whose frames all miss is then not aligned at all, and how many frames a clip has decides whether any
    frame is found: the clip's length changed its hints). Square frames gain nothing from this and skip it."""
    height, width = frame01.shape[:2]
    if height == width:
        return []
    factor = LANDMARK_RESOLUTION / min(height, width)
    w, h = max(1, round(width * factor)), max(1, round(height * factor))
    faces = backend.detect(to_uint8(resize_image(frame01, w, h)))
    return [face.scaled(LANDMARK_RESOLUTION / w, LANDMARK_RESOLUTION / h) for face in faces]


def frame_ranges(indices: Sequence[int]) -> str:
    """'0-3, 7, 9-10' for [0, 1, 2, 3, 7, 9, 10]: frame lists a user can read."""
    parts: list[str] = []
    indices = sorted(int(i) for i in indices)
    start = prev = None
    for i in indices + [None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(parts)


def _map_box(box: np.ndarray, affine: np.ndarray, scale: float) -> np.ndarray:
    """A box at 256 on a driving frame -> its bounds at 256 on the aligned frame (`affine` works at 256*scale)."""
    x0, y0, x1, y1 = (np.asarray(box, np.float64) * scale).tolist()
    corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], np.float64) @ affine.T / scale
    return np.concatenate([corners.min(0), corners.max(0)]).astype(np.float32)


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
    face_index: int = 0,
    face_order: str = LARGEST_FIRST,
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
    face_index, face_order: which driving face to follow when frames show several people (0: the largest).
    Raises FaceIndexError when the first frame with faces has fewer than `face_index + 1`.
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

    chosen_among: list = []

    def chooser(where: str, index: int, raw: bool) -> Callable[[list[Face], np.ndarray | None], Face]:
        def choose(faces: list[Face], near: np.ndarray | None) -> Face:
            if near is not None:
                return nearest_face(faces, near)
            if raw and not chosen_among:  # the user's choice, made on this driving frame: keep it to show it
                height, width = frames[index].shape[:2]
                sx, sy = width / LANDMARK_RESOLUTION, height / LANDMARK_RESOLUTION
                chosen_among.append((index, [f.scaled(sx, sy) for f in order_faces(faces, face_order)]))
            return pick_face(faces, face_index, face_order, where)
        return choose

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
    # The chosen person's box on each driving frame (at 256) where the alignment search found it.
    raw_boxes: list[np.ndarray | None] = [None] * num_frames
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
                    image = frame01(index)
                    face = _find_in_sequence(
                        backend, _to_landmark_copy(image), previous, track_missed_faces,
                        chooser(f"driving frame {index}", index, True), original=image,
                    )
                    driving_landmarks.append(None if face is None else face.landmarks)
                    raw_boxes[index] = None if face is None else face.box
                    previous = face or previous
                    step()
                chosen = best_matching_frame(reference_face.landmarks, driving_landmarks)
                if chosen is None:
                    warn("No face was found in any driving frame: the driving frames are not aligned.")
                best_landmarks = None if chosen is None else driving_landmarks[chosen]
            else:
                image = frame01(best_frame)
                faces = backend.detect(_to_landmark_copy(image)) or _detect_undistorted(backend, image)
                best_face = (chooser(f"best frame {best_frame}", best_frame, True)(faces, None) if faces
                             else None)
                best_landmarks = None if best_face is None else best_face.landmarks
                if best_landmarks is None:
                    warn(f"No face was found in the chosen best frame {best_frame}: the driving frames are not aligned.")
                else:
                    chosen = best_frame
                    raw_boxes[best_frame] = best_face.box
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
    # Where the chosen person's face should be on each aligned frame: its driving-frame box moved by the alignment.
    anchors: list[np.ndarray | None] = [None] * num_frames
    if affine is not None:
        known = [i for i, b in enumerate(raw_boxes) if b is not None]
        for index in range(num_frames):
            if known:  # the nearest frame where the search saw the chosen face
                source = min(known, key=lambda k: abs(k - index))
                anchors[index] = _map_box(raw_boxes[source], affine, scale)
    faces_256: list[Face | None] = []
    copies: list[np.ndarray] = []
    previous = None
    for index in range(num_frames):
        image = frame01(index)
        aligned = resize_image(image, resolution, resolution)
        if affine is not None:
            aligned = cv2.warpAffine(aligned, affine, (resolution, resolution))
        global_hint[index] = aligned.transpose(2, 0, 1) * np.float32(2.0) - np.float32(1.0)
        copy = _to_landmark_copy(aligned)
        copies.append(copy)
        face = _find_in_sequence(backend, copy, previous, track_missed_faces,
                                 chooser(f"driving frame {index}", index, affine is None),
                                 anchors[index] if previous is None else None,
                                 original=image if affine is None else None)
        faces_256.append(face)
        previous = face or previous
        step()

    # Frames before the first detection have no previous face to search near: search backwards from the next one.
    if track_missed_faces and isinstance(backend, BoxAwareFaceBackend):
        for index in range(num_frames - 2, -1, -1):
            if faces_256[index] is None and faces_256[index + 1] is not None:
                faces_256[index] = backend.detect_near(copies[index], faces_256[index + 1].box)

    missed, recovered = [], []
    for index, face in enumerate(faces_256):
        if face is None:
            aligned_faces.append(None)
            missed.append(index)
            continue
        faces_found[index] = True
        tracked[index] = face.tracked
        if face.tracked:
            recovered.append(index)
        boxes = local_hint_boxes(face.landmarks, resolution)
        local_boxes[index] = boxes
        for x0, y0, x1, y1 in boxes:
            local_hint[index, :, y0:y1, x0:x1] = global_hint[index, :, y0:y1, x0:x1]
        aligned_faces.append(face.scaled(scale))
    if missed:
        if len(missed) == num_frames:
            warn(f"No face was found in any of the {num_frames} driving frames: every eye/mouth (local) hint is "
                 "empty.")
        else:
            warn(f"No face was found in driving frame{'s' if len(missed) > 1 else ''} {frame_ranges(missed)} "
                 f"({len(missed)} of {num_frames}): {'their' if len(missed) > 1 else 'its'} eye/mouth (local) hint "
                 "is left empty.")
    if recovered:
        warn(f"Driving frame{'s' if len(recovered) > 1 else ''} {frame_ranges(recovered)}: the detector missed the "
             "face; it was recovered near a neighbouring frame's face.")

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
        chosen_among=chosen_among[0] if chosen_among else None,
    )
