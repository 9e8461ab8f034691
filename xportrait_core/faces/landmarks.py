"""Faces, offline: a detector giving 68 landmarks (iBUG 300-W layout) and a 128-d identity descriptor.

The official code uses `face_alignment`, which downloads its networks at run time; that fails offline and on render
farms. The default backend here is dlib (HOG detector, 68-point shape predictor, ResNet descriptor) with the model
files shipped inside the `face-recognition-models` wheel, so nothing is ever downloaded.

Any object with `detect` and `describe` (the `FaceBackend` protocol) can replace it. A backend that can also fit
landmarks in a given box and look for a weak face near a box (`BoxAwareFaceBackend`, which dlib's is) lets the
motion extraction keep a face it briefly loses and refine landmarks found on a downscaled copy.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..media.image_formats import as_rgb_uint8, resize_image

NUM_LANDMARKS = 68
DESCRIPTOR_SIZE = 128
MODELS_ENV = "XPORTRAIT_FACE_MODELS"


class NoFaceFoundError(ValueError):
    """No face was found where one is required. `where` names the image (e.g. "the reference image")."""

    def __init__(self, where: str, detail: str = "", advice: str = ""):
        self.where = where
        message = f"No face was found in {where}{f' {detail}' if detail else ''}."
        hint = (
            " The detector needs a roughly frontal face, not too small (about 80 pixels wide after any downscaling)"
            " and not cut off by the image border."
        )
        super().__init__(message + hint + (f" {advice}" if advice else ""))


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in the pixel coordinates of the image it was found in.

    box: float32 (4,) x0, y0, x1, y1 of the detector's box. landmarks: float32 (68, 2) as (x, y), iBUG 300-W order
    (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67). score: the detector's confidence (backend units).
    tracked: the detector missed this face; it was recovered near the previous frame's box.
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float = 0.0
    tracked: bool = False

    def scaled(self, sx: float, sy: float | None = None) -> Face:
        """The same face in an image resized by (sx, sy): coordinates multiplied, as the official code does."""
        sy = sx if sy is None else sy
        return replace(
            self,
            box=(self.box * np.array([sx, sy, sx, sy], np.float32)).astype(np.float32),
            landmarks=(self.landmarks * np.array([sx, sy], np.float32)).astype(np.float32),
        )

    @property
    def landmark_box(self) -> np.ndarray:
        """float32 (4,) x0, y0, x1, y1 spanned by the 68 landmarks (the box the official alignment matches)."""
        return np.concatenate([self.landmarks.min(0), self.landmarks.max(0)]).astype(np.float32)


@runtime_checkable
class FaceBackend(Protocol):
    """What the face tools need from a detector. Images are uint8 RGB (H, W, 3), contiguous."""

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in the image, the main one (e.g. the largest) first; [] when there is none."""
        ...

    def describe(self, image: np.ndarray, face: Face) -> np.ndarray:
        """float32 (128,) identity descriptor of `face` (found in this same image); dlib's scale: same person < 0.6."""
        ...


@runtime_checkable
class BoxAwareFaceBackend(FaceBackend, Protocol):
    """Optional extras: landmarks inside a known box, and a relaxed search for a face near a known box."""

    def landmarks_in_box(self, image: np.ndarray, box: np.ndarray) -> Face:
        ...

    def detect_near(self, image: np.ndarray, box: np.ndarray) -> Face | None:
        ...


def face_models_dir() -> Path:
    """Where the dlib model files are: $XPORTRAIT_FACE_MODELS, else inside the installed face_recognition_models.

    The package is located without importing it: its __init__ needs pkg_resources, which recent setuptools lack.
    """
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env)
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The face models are missing: `pip install face-recognition-models` (it ships the dlib landmark and "
            f"descriptor models), or point ${MODELS_ENV} at a folder holding them."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _import_dlib():
    try:
        import dlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("dlib is missing: `pip install dlib-bin` (prebuilt wheels, no compiler needed)") from error
    return dlib


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class DlibFaceBackend:
    """dlib's HOG frontal face detector, 68-point shape predictor and ResNet face descriptor (all CPU, offline).

    upsample_on_miss: when nothing is found, look again on a copy upsampled this many times (finds faces down to
    ~40 px at 1; costs ~4x the first pass, only on misses). near_threshold / near_min_iou: `detect_near` accepts a
    detection scoring above this (dlib's default cut is 0) that overlaps the given box at least this much.
    Models are loaded on first use (the 68-point predictor takes about a second).
    """

    PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
    DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        upsample_on_miss: int = 1,
        near_threshold: float = -0.6,
        near_min_iou: float = 0.3,
        descriptor_jitters: int = 0,
        descriptor_padding: float = 0.25,
    ):
        self._dlib = _import_dlib()
        self.model_dir = Path(model_dir) if model_dir is not None else face_models_dir()
        self.upsample_on_miss = int(upsample_on_miss)
        self.near_threshold = float(near_threshold)
        self.near_min_iou = float(near_min_iou)
        self.descriptor_jitters = int(descriptor_jitters)
        self.descriptor_padding = float(descriptor_padding)
        self._detector = None
        self._predictor = None
        self._descriptor = None

    def _model_file(self, name: str) -> str:
        path = self.model_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"Face model file {name} not found in {self.model_dir}: `pip install face-recognition-models` "
                f"or set ${MODELS_ENV} to a folder containing it."
            )
        return str(path)

    @property
    def detector(self):
        if self._detector is None:
            self._detector = self._dlib.get_frontal_face_detector()
        return self._detector

    @property
    def predictor(self):
        if self._predictor is None:
            self._predictor = self._dlib.shape_predictor(self._model_file(self.PREDICTOR_FILE))
        return self._predictor

    @property
    def descriptor_model(self):
        if self._descriptor is None:
            self._descriptor = self._dlib.face_recognition_model_v1(self._model_file(self.DESCRIPTOR_FILE))
        return self._descriptor

    def _rect(self, box) -> object:
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        return self._dlib.rectangle(x0, y0, x1, y1)

    def _face(self, image: np.ndarray, rect, score: float, tracked: bool = False) -> Face:
        shape = self.predictor(image, rect)
        points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
        box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float32)
        return Face(box=box, landmarks=points, score=float(score), tracked=tracked)

    def _run(self, image: np.ndarray, threshold: float) -> list[tuple[object, float]]:
        rects, scores, _ = self.detector.run(image, 0, threshold)
        if not rects and self.upsample_on_miss > 0:
            rects, scores, _ = self.detector.run(image, self.upsample_on_miss, threshold)
        return list(zip(rects, scores))

    def detect(self, image: np.ndarray) -> list[Face]:
        image = as_rgb_uint8(image)
        found = self._run(image, 0.0)
        found.sort(key=lambda rs: rs[0].width() * rs[0].height(), reverse=True)
        return [self._face(image, rect, score) for rect, score in found]

    def landmarks_in_box(self, image: np.ndarray, box: np.ndarray) -> Face:
        image = as_rgb_uint8(image)
        return self._face(image, self._rect(box), 0.0)

    def detect_near(self, image: np.ndarray, box: np.ndarray) -> Face | None:
        image = as_rgb_uint8(image)
        box = np.asarray(box, np.float32)
        best = None
        for rect, score in self._run(image, self.near_threshold):
            candidate = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], np.float32)
            if _box_iou(candidate, box) >= self.near_min_iou and (best is None or score > best[1]):
                best = (rect, score)
        return None if best is None else self._face(image, best[0], best[1], tracked=True)

    def describe(self, image: np.ndarray, face: Face) -> np.ndarray:
        image = as_rgb_uint8(image)
        dlib = self._dlib
        points = [dlib.point(int(round(float(x))), int(round(float(y)))) for x, y in face.landmarks]
        shape = dlib.full_object_detection(self._rect(face.box), points)
        vector = self.descriptor_model.compute_face_descriptor(
            image, shape, self.descriptor_jitters, self.descriptor_padding
        )
        return np.asarray(vector, dtype=np.float32)


@functools.lru_cache(maxsize=1)
def default_face_backend() -> DlibFaceBackend:
    """The shared dlib backend (created once; its models load on first use)."""
    return DlibFaceBackend()


def detect_faces(image: np.ndarray, backend: FaceBackend | None = None, max_side: int | None = None) -> list[Face]:
    """Faces in `image` (any accepted layout), in its own pixel coordinates, main face first.

    max_side: detect on a copy whose longer side is at most this (HOG cost grows with the area); the landmarks are
    then refitted at full resolution when the backend can (`landmarks_in_box`), else scaled back.
    """
    backend = backend or default_face_backend()
    image = as_rgb_uint8(image)
    h, w = image.shape[:2]
    scale = 1.0
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
    if scale == 1.0:
        return list(backend.detect(image))
    small = resize_image(image, max(1, round(w * scale)), max(1, round(h * scale)))
    sx, sy = w / small.shape[1], h / small.shape[0]
    faces = [face.scaled(sx, sy) for face in backend.detect(small)]
    if isinstance(backend, BoxAwareFaceBackend):
        faces = [replace(backend.landmarks_in_box(image, f.box), score=f.score) for f in faces]
    return faces


LARGEST_FIRST = "largest first"
LEFT_TO_RIGHT = "left to right"
FACE_ORDERS = (LARGEST_FIRST, LEFT_TO_RIGHT)


class FaceIndexError(ValueError):
    """A face index beyond the faces found; the message says how many there are."""


def order_faces(faces: list[Face], order: str = LARGEST_FIRST) -> list[Face]:
    """The faces numbered as the user counts them: largest first (the backend's own order, main face first, which
    for dlib is by box area), or left to right (by the box's centre)."""
    if order == LARGEST_FIRST:
        return list(faces)
    if order == LEFT_TO_RIGHT:
        return sorted(faces, key=lambda f: float(f.box[0] + f.box[2]))
    raise ValueError(f"face order must be one of {', '.join(FACE_ORDERS)}, got {order!r}")


def pick_face(faces: list[Face], index: int, order: str, where: str) -> Face:
    """Face number `index` (from 0) of `faces` in `order`; FaceIndexError naming `where` and the count otherwise."""
    ordered = order_faces(faces, order)
    if not 0 <= index < len(ordered):
        count = len(ordered)
        raise FaceIndexError(
            f"face_index {index} asks for face {index + 1} ({order}), but {where} has "
            f"{count} face{'' if count == 1 else 's'}: use 0{f'..{count - 1}' if count > 1 else ''}"
        )
    return ordered[index]


def nearest_face(faces: list[Face], box: np.ndarray) -> Face:
    """The face whose box centre is closest to `box`'s: how a chosen face is followed from frame to frame."""
    box = np.asarray(box, np.float32)
    centre = np.array([(box[0] + box[2]) * 0.5, (box[1] + box[3]) * 0.5], np.float32)

    def distance(face: Face) -> float:
        c = np.array([(face.box[0] + face.box[2]) * 0.5, (face.box[1] + face.box[3]) * 0.5], np.float32)
        return float(np.square(c - centre).sum())

    return min(faces, key=distance)


def find_face(
    image: np.ndarray,
    where: str,
    backend: FaceBackend | None = None,
    max_side: int | None = None,
    index: int = 0,
    order: str = LARGEST_FIRST,
) -> Face:
    """Face number `index` in `order` (default: the largest) in `image`; raises NoFaceFoundError naming `where` when
    there is none, FaceIndexError when there are fewer faces than `index` asks for."""
    faces = detect_faces(image, backend, max_side)
    if not faces:
        h, w = np.asarray(image).shape[:2]
        raise NoFaceFoundError(where, f"(searched the whole {w}x{h} image)")
    return pick_face(faces, index, order, where)
