"""Identity metric: does each animated frame still look like the reference, and not like the driving actor?

Per frame, the 128-d face descriptor of the output is compared with the reference's (identity kept: small distance)
and with its driving frame's (appearance leakage: the output drifting towards the actor). Distances are dlib's
euclidean ones, whose usual "same person" cut is 0.6; cosine similarities are given beside them. Frames where no
face is found are reported (NaN), never fatal; only the reference must have a face.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..media.image_formats import as_frame_batch, as_rgb_uint8
from .landmarks import (
    DESCRIPTOR_SIZE,
    FaceBackend,
    default_face_backend,
    detect_faces,
    find_face,
)

DEFAULT_THRESHOLD = 0.6
DETECT_MAX_SIDE = 1024


def descriptor_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance along the last axis (dlib's face distance); NaN propagates."""
    return np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1).astype(np.float32)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    dot = np.sum(a * b, axis=-1)
    return (dot / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).astype(np.float32)


def face_descriptor(
    image: np.ndarray, where: str = "the image", backend: FaceBackend | None = None
) -> np.ndarray:
    """float32 (128,) descriptor of the main face; raises NoFaceFoundError naming `where` when there is none."""
    backend = backend or default_face_backend()
    image = as_rgb_uint8(image, where)
    face = find_face(image, where, backend, max_side=DETECT_MAX_SIDE)
    return backend.describe(image, face)


def frame_descriptors(frames, backend: FaceBackend | None = None, what: str = "frames",
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
    """float32 (N, 128): one descriptor per frame, a NaN row where no face is found.

    progress: called with the number of frames done after each one (it may raise to stop the work)."""
    backend = backend or default_face_backend()
    batch = as_frame_batch(frames, what)
    out = np.full((len(batch), DESCRIPTOR_SIZE), np.nan, np.float32)
    for index, frame in enumerate(batch):
        image = as_rgb_uint8(frame, f"{what} {index}")
        faces = detect_faces(image, backend, max_side=DETECT_MAX_SIDE)
        if faces:
            out[index] = backend.describe(image, faces[0])
        if progress is not None:
            progress(index + 1)
    return out


@dataclass(eq=False)
class IdentityReport:
    """Per-frame identity measurements (float32 (N,), NaN where the output frame has no face).

    reference_distance / reference_cosine: output frame vs the reference (identity preservation).
    driving_distance / driving_cosine: output frame vs its driving frame (appearance leakage); None when no
        driving frames were given, NaN where either frame has no face.
    """

    reference_distance: np.ndarray
    reference_cosine: np.ndarray
    driving_distance: np.ndarray | None
    driving_cosine: np.ndarray | None
    output_faces_found: np.ndarray
    driving_faces_found: np.ndarray | None
    threshold: float

    @property
    def num_frames(self) -> int:
        return int(self.reference_distance.shape[0])

    @property
    def missing_frames(self) -> list[int]:
        """Output frames where no face was found."""
        return [int(i) for i in np.flatnonzero(~self.output_faces_found)]

    @property
    def mean_distance(self) -> float:
        """Mean distance to the reference over frames with a face (NaN when there is none)."""
        valid = self.reference_distance[self.output_faces_found]
        return float(valid.mean()) if valid.size else float("nan")

    @property
    def worst_frame(self) -> int | None:
        """The frame farthest from the reference (None when no frame has a face)."""
        if not self.output_faces_found.any():
            return None
        return int(np.nanargmax(self.reference_distance))

    @property
    def worst_distance(self) -> float:
        frame = self.worst_frame
        return float("nan") if frame is None else float(self.reference_distance[frame])

    @property
    def frames_over_threshold(self) -> list[int]:
        """Frames whose distance to the reference exceeds the threshold (likely no longer the same person)."""
        with np.errstate(invalid="ignore"):
            return [int(i) for i in np.flatnonzero(self.reference_distance > self.threshold)]

    @property
    def frames_closer_to_driving(self) -> list[int]:
        """Frames that look more like their driving frame than like the reference (appearance leakage)."""
        if self.driving_distance is None:
            return []
        with np.errstate(invalid="ignore"):
            return [int(i) for i in np.flatnonzero(self.driving_distance < self.reference_distance)]

    def summary(self) -> dict:
        """Plain numbers, JSON-friendly."""
        out = {
            "frames": self.num_frames,
            "threshold": self.threshold,
            "mean_distance": self.mean_distance,
            "mean_cosine": float(np.nanmean(self.reference_cosine)) if self.output_faces_found.any() else float("nan"),
            "worst_frame": self.worst_frame,
            "worst_distance": self.worst_distance,
            "frames_over_threshold": self.frames_over_threshold,
            "missing_frames": self.missing_frames,
        }
        if self.driving_distance is not None:
            valid = ~np.isnan(self.driving_distance)
            out["mean_driving_distance"] = float(self.driving_distance[valid].mean()) if valid.any() else float("nan")
            out["frames_closer_to_driving"] = self.frames_closer_to_driving
        return out

    def summary_text(self) -> str:
        """The report a user reads: frames without a face are named as such and left out of the means; when no
        frame has a face the text says identity could not be measured (never "nan")."""
        s = self.summary()
        if not self.output_faces_found.any():
            return (f"identity over {s['frames']} frame{'' if s['frames'] == 1 else 's'}: not measured: no face was "
                    "found in any frame (are these the animated frames, and do they show a face?)")
        lines = [
            (
                f"identity over {s['frames']} frames: mean distance {s['mean_distance']:.3f} "
                f"(cosine {s['mean_cosine']:.3f}), worst frame {s['worst_frame']} at {s['worst_distance']:.3f}"
            ),
            f"frames over {s['threshold']:.2f}: {len(s['frames_over_threshold'])} {_short_list(s['frames_over_threshold'])}",
        ]
        if s["missing_frames"]:
            count = len(s["missing_frames"])
            lines.append(f"no face found in {count} frame{'' if count == 1 else 's'} "
                         f"{_short_list(s['missing_frames'])}: left out of the mean")
        if "mean_driving_distance" in s and np.isfinite(s["mean_driving_distance"]):
            lines.append(
                f"distance to the driving frames: mean {s['mean_driving_distance']:.3f}; frames closer to the driving "
                f"actor than to the reference: {len(s['frames_closer_to_driving'])} {_short_list(s['frames_closer_to_driving'])}"
            )
        return "\n".join(lines)


def _short_list(items: list[int], limit: int = 12) -> str:
    if not items:
        return ""
    shown = ", ".join(str(i) for i in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"


def measure_identity(
    reference: np.ndarray,
    frames,
    driving_frames=None,
    threshold: float = DEFAULT_THRESHOLD,
    backend: FaceBackend | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> IdentityReport:
    """Compare every output frame with the reference (and with its driving frame when given).

    reference: an image (any layout; it must show a face, else NoFaceFoundError) or a precomputed (128,) descriptor.
    frames, driving_frames: (N, H, W, C) arrays or sequences of images, uint8 or float [0, 1]; equal lengths.
    progress: called as progress(done, total) after every frame looked at (output frames, then driving frames);
        it may raise to stop the work (a host's interruption).
    """
    backend = backend or default_face_backend()
    reference = np.asarray(reference)
    if reference.shape == (DESCRIPTOR_SIZE,):
        reference_descriptor = reference.astype(np.float32)
    else:
        reference_descriptor = face_descriptor(reference, "the reference image", backend)
    output_batch = as_frame_batch(frames, "output frames")
    driving_batch = None
    if driving_frames is not None:
        driving_batch = as_frame_batch(driving_frames, "driving frames")
        if len(driving_batch) != len(output_batch):
            raise ValueError(
                f"got {len(output_batch)} output frames but {len(driving_batch)} driving frames: pass one driving "
                "frame per output frame"
            )
    total = len(output_batch) * (1 if driving_batch is None else 2)

    def step(offset: int):
        return None if progress is None else (lambda done: progress(offset + done, total))

    outputs = frame_descriptors(output_batch, backend, "output frames", step(0))
    output_found = ~np.isnan(outputs[:, 0])
    driving_distance = driving_cosine = driving_found = None
    if driving_batch is not None:
        driving = frame_descriptors(driving_batch, backend, "driving frames", step(len(output_batch)))
        driving_found = ~np.isnan(driving[:, 0])
        driving_distance = descriptor_distance(outputs, driving)
        driving_cosine = cosine_similarity(outputs, driving)
    return IdentityReport(
        reference_distance=descriptor_distance(outputs, reference_descriptor),
        reference_cosine=cosine_similarity(outputs, reference_descriptor),
        driving_distance=driving_distance,
        driving_cosine=driving_cosine,
        output_faces_found=output_found,
        driving_faces_found=driving_found,
        threshold=float(threshold),
    )


_REFERENCE_COLOUR = (31, 119, 180)
_DRIVING_COLOUR = (255, 127, 14)
_THRESHOLD_COLOUR = (214, 39, 40)
_MISSING_COLOUR = (127, 127, 127)


def plot_identity(report: IdentityReport, width: int = 768, height: int = 320) -> np.ndarray:
    """uint8 (height, width, 3) RGB chart of the per-frame distances (reference, driving), the threshold and the
    frames with no face (grey crosses on the axis)."""
    if width < 200 or height < 120:
        raise ValueError(f"plot size must be at least 200x120, got {width}x{height}")
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 48, width - 12, 28, height - 28
    n = report.num_frames
    curves = [report.reference_distance] + ([report.driving_distance] if report.driving_distance is not None else [])
    finite = np.concatenate([c[np.isfinite(c)] for c in curves] + [np.array([report.threshold, 1.0])])
    y_max = float(np.ceil(finite.max() * 5) / 5)

    def x_of(i: float) -> float:
        return left + (right - left) * (i / max(n - 1, 1))

    def y_of(v: float) -> float:
        return bottom - (bottom - top) * (v / y_max)

    for tick in np.arange(0.0, y_max + 1e-6, 0.2):
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((4, y - 6), f"{tick:.1f}", fill=(60, 60, 60), font=font)
    step = max(1, int(np.ceil(n / 10)))
    for i in range(0, n, step):
        draw.text((x_of(i) - 4, bottom + 6), str(i), fill=(60, 60, 60), font=font)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))

    y = y_of(report.threshold)
    for x in np.arange(left, right, 10):
        draw.line([(x, y), (min(x + 5, right), y)], fill=_THRESHOLD_COLOUR, width=1)

    for curve, colour in zip(curves, (_REFERENCE_COLOUR, _DRIVING_COLOUR)):
        run: list[tuple[float, float]] = []
        for i, v in enumerate(curve):
            if np.isfinite(v):
                run.append((x_of(i), y_of(float(v))))
                continue
            _draw_run(draw, run, colour)
            run = []
        _draw_run(draw, run, colour)
    for i in report.missing_frames:
        x = x_of(i)
        draw.line([(x - 3, bottom - 3), (x + 3, bottom + 3)], fill=_MISSING_COLOUR, width=2)
        draw.line([(x - 3, bottom + 3), (x + 3, bottom - 3)], fill=_MISSING_COLOUR, width=2)

    title = f"distance to reference (mean {report.mean_distance:.2f})"
    draw.text((left, 6), title, fill=_REFERENCE_COLOUR, font=font)
    legend_x = left + draw.textlength(title, font=font) + 16
    if report.driving_distance is not None:
        text = "to driving frame"
        draw.text((legend_x, 6), text, fill=_DRIVING_COLOUR, font=font)
        legend_x += draw.textlength(text, font=font) + 16
    draw.text((legend_x, 6), f"threshold {report.threshold:.2f}", fill=_THRESHOLD_COLOUR, font=font)
    return np.asarray(image, dtype=np.uint8).copy()


def _draw_run(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour) -> None:
    if len(points) == 1:
        x, y = points[0]
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    elif points:
        draw.line(points, fill=colour, width=2)
