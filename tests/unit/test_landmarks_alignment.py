"""Landmarks (offline dlib backend) and the official alignment / global and local motion hints, on the sample assets."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from xportrait_core.faces.motion_hints import (
    LOCAL_REGIONS,
    MotionHints,
    alignment_box_corners,
    best_matching_frame,
    extract_motion,
    local_hint_boxes,
)
from xportrait_core.media.image_formats import resize_image, to_uint8
from xportrait_core.faces.landmarks import (
    Face,
    NoFaceFoundError,
    default_face_backend,
    detect_faces,
    find_face,
)


@pytest.fixture(scope="session")
def motion(driving_frames, portrait) -> MotionHints:
    """The whole 60-frame video at 512 with the best-frame search, once per session."""
    return extract_motion(driving_frames, portrait, resolution=512, best_frame=-1)


def _copy_256(image_uint8: np.ndarray) -> np.ndarray:
    return to_uint8(resize_image(image_uint8.astype(np.float32) / 255.0, 256, 256))


def _box_mask(boxes: np.ndarray, resolution: int) -> np.ndarray:
    mask = np.zeros((resolution, resolution), bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def test_reference_face_found(portrait):
    faces = detect_faces(portrait)
    assert len(faces) == 1
    face = faces[0]
    assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
    assert (face.landmarks >= 0).all() and (face.landmarks < 512).all()
    eyes_y = face.landmarks[36:48, 1].mean()
    mouth_y = face.landmarks[48:68, 1].mean()
    chin_y = face.landmarks[8, 1]
    assert eyes_y < mouth_y < chin_y  # the 68-point layout the official code indexes
    # a face filling most of the portrait, centred horizontally
    x0, _, x1, _ = face.landmark_box
    assert 200 < x1 - x0 < 350 and abs((x0 + x1) / 2 - 256) < 30


def test_every_sampled_driving_frame_has_a_face(driving_frames):
    backend = default_face_backend()
    for index in (0, 15, 30, 45, 59):
        assert len(backend.detect(_copy_256(driving_frames[index]))) >= 1, index


def test_motion_hint_layout(motion, driving_frames):
    n = len(driving_frames)
    assert n == 60
    assert motion.global_hint.shape == (n, 3, 512, 512) and motion.global_hint.dtype == np.float32
    assert motion.local_hint.shape == (n, 3, 512, 512) and motion.local_hint.dtype == np.float32
    assert motion.global_hint.min() >= -1.0 and motion.global_hint.max() <= 1.0
    assert motion.faces_found.all() and not motion.tracked.any()
    assert motion.warnings == []


def test_best_frame_is_the_closest_pose(motion, driving_frames, portrait):
    best = motion.best_frame
    assert isinstance(best, int) and 0 <= best < len(driving_frames)
    backend = default_face_backend()
    reference = backend.detect(_copy_256(portrait))[0].landmarks
    diffs = {}
    for index in sorted({0, 12, 24, 36, 48, 59, best}):
        landmarks = backend.detect(_copy_256(driving_frames[index]))[0].landmarks
        diffs[index] = float(np.abs(reference - landmarks).sum())
    assert all(diffs[best] <= d for d in diffs.values()), diffs


def test_global_hint_is_the_warped_frame(motion, driving_frames):
    assert motion.affine is not None and motion.affine.shape == (2, 3)
    for index in (0, motion.best_frame):
        frame = resize_image(driving_frames[index].astype(np.float32) / 255.0, 512, 512)
        expected = cv2.warpAffine(frame, motion.affine, (512, 512)).transpose(2, 0, 1) * 2 - 1
        np.testing.assert_allclose(motion.global_hint[index], expected, atol=1e-6)


def test_alignment_puts_the_driving_face_on_the_reference(motion):
    """The landmark box re-detected on the aligned best frame lands on the reference's (both at 512)."""
    reference_landmarks = motion.reference_face.landmarks
    aligned_landmarks = motion.aligned_faces[motion.best_frame].landmarks
    reference = alignment_box_corners(reference_landmarks)
    aligned = alignment_box_corners(aligned_landmarks)
    # re-detection moves dlib's jaw points by a few pixels (measured: 9.6 px at the chin, 1.6 elsewhere); the
    # centroid of all 68 points is steadier (2.6 px)
    assert np.abs(aligned - reference).max() <= 12.0  # 6 px at the 256 detection scale
    assert np.abs(aligned_landmarks.mean(0) - reference_landmarks.mean(0)).max() <= 4.0
    for index in range(0, 60, 10):  # the other frames move with the head but stay near
        corners = alignment_box_corners(motion.aligned_faces[index].landmarks)
        assert np.abs(corners - reference).max() <= 48.0


def test_alignment_undoes_a_moved_and_shrunk_driving_video(driving_frames, portrait):
    """Driving frames shrunk to 60% and pushed into a corner: the affine brings the face back onto the reference."""
    frames = []
    for index in (10, 30, 50):
        canvas = np.full((512, 512, 3), 40, np.uint8)
        small = cv2.resize(driving_frames[index], (307, 307), interpolation=cv2.INTER_AREA)
        canvas[20:327, 190:497] = small
        frames.append(canvas)
    hints = extract_motion(np.stack(frames), portrait, resolution=512)
    reference = alignment_box_corners(hints.reference_face.landmarks)
    best = hints.best_frame
    assert best in (0, 1, 2)
    assert hints.affine[0, 0] > 1.4 and hints.affine[1, 1] > 1.4  # it undoes the shrinking
    aligned = alignment_box_corners(hints.aligned_faces[best].landmarks)
    assert np.abs(aligned - reference).max() <= 12.0  # measured 2.1
    unaligned = alignment_box_corners(detect_faces(frames[best])[0].landmarks)
    assert np.abs(unaligned - reference).max() > 60.0  # the test is not trivially satisfied


def test_local_hint_is_minus_one_outside_the_three_boxes(motion):
    for index in range(motion.num_frames):
        boxes = motion.local_boxes[index]
        assert ((boxes[:, 2] - boxes[:, 0]) == 128).all() and ((boxes[:, 3] - boxes[:, 1]) == 128).all()
        assert (boxes >= 0).all() and (boxes <= 512).all()
        inside = _box_mask(boxes, 512)
        local, global_ = motion.local_hint[index], motion.global_hint[index]
        assert (local[:, ~inside] == -1.0).all()
        np.testing.assert_array_equal(local[:, inside], global_[:, inside])
    # the boxes sit on the eyes and the mouth of the aligned face
    face = motion.aligned_faces[motion.best_frame]
    boxes = motion.local_boxes[motion.best_frame]
    for (x0, y0, x1, y1), region in zip(boxes, LOCAL_REGIONS):
        cx, cy = face.landmarks[region].mean(0)
        assert x0 <= cx < x1 and y0 <= cy < y1


def test_local_boxes_follow_the_official_slices_and_clip():
    """Exact arithmetic: slices 43:48, 37:42, 49:68 (points 36, 42, 48 ignored), rounding, clip to [32, 223]."""
    landmarks = np.zeros((68, 2), np.float32)
    landmarks[43:48] = (180.4, 100.0)
    landmarks[37:42] = (10.0, 90.6)  # clipped to x = 32
    landmarks[49:68] = (128.0, 250.0)  # clipped to y = 223
    landmarks[[36, 42, 48]] = (0.0, 0.0)  # outliers the official slices skip
    boxes = local_hint_boxes(landmarks, 512)
    np.testing.assert_array_equal(boxes[0], [360 - 64, 200 - 64, 360 + 64, 200 + 64])
    np.testing.assert_array_equal(boxes[1], [64 - 64, 182 - 64, 64 + 64, 182 + 64])
    np.testing.assert_array_equal(boxes[2], [256 - 64, 446 - 64, 256 + 64, 446 + 64])
    boxes_768 = local_hint_boxes(landmarks, 768)  # any multiple of 64: centres * 3, half size 96
    np.testing.assert_array_equal(boxes_768[0], [540 - 96, 300 - 96, 540 + 96, 300 + 96])
    assert (boxes_768[:, :2] >= 0).all() and (boxes_768[:, 2:] <= 768).all()


class _FixedFaceBackend:
    """A plugged-in detector: the same landmarks for every image that is not flat."""

    def __init__(self, landmarks: np.ndarray):
        self.landmarks = landmarks
        self.calls = 0

    def detect(self, image):
        self.calls += 1
        if image.std() < 1:
            return []
        box = np.concatenate([self.landmarks.min(0), self.landmarks.max(0)])
        return [Face(box=box, landmarks=self.landmarks)]

    def describe(self, image, face):
        return np.zeros(128, np.float32)


def test_a_plugged_in_backend_is_used():
    rng = np.random.default_rng(0)
    landmarks = rng.uniform(60, 200, (68, 2)).astype(np.float32)
    backend = _FixedFaceBackend(landmarks)
    frames = rng.uniform(0, 1, (3, 100, 150, 3)).astype(np.float32)
    hints = extract_motion(frames, frames[0], resolution=256, backend=backend)
    assert backend.calls == 1 + 3 + 3  # reference, search, aligned frames
    assert hints.best_frame == 0  # all equal: the first wins, as in the official loop
    np.testing.assert_allclose(hints.affine, [[1, 0, 0], [0, 1, 0]], atol=1e-5)
    np.testing.assert_array_equal(hints.local_boxes[1], local_hint_boxes(landmarks, 256))


def test_a_frame_without_a_face_gets_an_empty_local_hint_and_a_warning(driving_frames, portrait):
    frames = driving_frames[[0, 1, 2]].copy()
    frames[1] = 128  # a flat grey frame
    hints = extract_motion(frames, portrait, resolution=256, best_frame=0)
    assert hints.faces_found.tolist() == [True, False, True]
    assert (hints.local_hint[1] == -1.0).all()
    assert (hints.local_boxes[1] == -1).all() and hints.aligned_faces[1] is None
    assert any("frame 1" in w and "No face" in w for w in hints.warnings)
    assert not (hints.local_hint[0] == -1.0).all()


def test_a_briefly_lost_face_is_recovered_near_the_previous_box(driving_frames, portrait):
    frames = driving_frames[[4, 5]].copy()
    x0, y0, x1, y1 = (default_face_backend().detect(_copy_256(frames[1]))[0].box * 2).astype(int)
    frames[1, y0 : y0 + int(0.3 * (y1 - y0)), x0:x1] = 0  # brows and forehead hidden: the detector misses
    assert default_face_backend().detect(_copy_256(frames[1])) == []
    tracked = extract_motion(frames, portrait, resolution=256, best_frame=-2)
    assert tracked.faces_found.tolist() == [True, True] and tracked.tracked.tolist() == [False, True]
    assert any("frame 1" in w and "recovered" in w for w in tracked.warnings)
    strict = extract_motion(frames, portrait, resolution=256, best_frame=-2, track_missed_faces=False)
    assert strict.faces_found.tolist() == [True, False] and (strict.local_hint[1] == -1).all()


def test_no_alignment_mode(driving_frames, portrait):
    frames = driving_frames[:2]
    hints = extract_motion(frames, portrait, resolution=256, best_frame=-2)
    assert hints.best_frame is None and hints.affine is None and hints.reference_face is None
    expected = resize_image(frames[1].astype(np.float32) / 255.0, 256, 256).transpose(2, 0, 1) * 2 - 1
    np.testing.assert_allclose(hints.global_hint[1], expected, atol=1e-6)


def test_explicit_best_frame_and_resolution_scaling(driving_frames, portrait):
    frames = driving_frames[30:40]
    at_512 = extract_motion(frames, portrait, resolution=512, best_frame=6)
    at_256 = extract_motion(frames, portrait, resolution=256, best_frame=6)
    assert at_512.best_frame == 6 == at_256.best_frame
    # the same alignment at both sizes: linear part equal, translation proportional to the resolution
    np.testing.assert_allclose(at_512.affine[:, :2], at_256.affine[:, :2], rtol=1e-6)
    np.testing.assert_allclose(at_512.affine[:, 2], 2 * at_256.affine[:, 2], rtol=1e-5, atol=1e-5)
    assert ((at_256.local_boxes[:, :, 2] - at_256.local_boxes[:, :, 0]) == 64).all()  # half size 256 // 8
    assert at_256.global_hint.shape == (10, 3, 256, 256)


def test_float_frames_in_any_size_are_accepted(driving_frames, portrait):
    frames_u8 = driving_frames[[3, 7]]
    frames_float = frames_u8.astype(np.float32) / 255.0
    a = extract_motion(frames_u8, portrait, resolution=256, best_frame=0)
    b = extract_motion(frames_float, portrait.astype(np.float32) / 255.0, resolution=256, best_frame=0)
    np.testing.assert_allclose(a.global_hint, b.global_hint, atol=1e-6)
    np.testing.assert_array_equal(a.local_boxes, b.local_boxes)
    wide = np.stack([cv2.resize(f, (400, 300)) for f in frames_u8])  # non-square: stretched like the official
    c = extract_motion(wide, portrait, resolution=256, best_frame=0)
    assert c.global_hint.shape == (2, 3, 256, 256) and c.faces_found.all()


def test_bad_inputs_give_clear_errors(driving_frames, portrait):
    with pytest.raises(ValueError, match="empty"):
        extract_motion(np.zeros((0, 64, 64, 3), np.uint8), portrait)
    with pytest.raises(ValueError, match="empty"):
        extract_motion([], portrait)
    with pytest.raises(ValueError, match="out of range"):
        extract_motion(driving_frames[:3], portrait, best_frame=3)
    with pytest.raises(ValueError, match="best_frame"):
        extract_motion(driving_frames[:3], portrait, best_frame=-3)
    with pytest.raises(ValueError, match="multiple of 64"):
        extract_motion(driving_frames[:1], portrait, resolution=500)


def test_an_image_without_a_face_raises_no_face_found():
    flat = np.full((300, 400, 3), 200, np.uint8)
    with pytest.raises(NoFaceFoundError, match="No face was found in the test image") as info:
        find_face(flat, "the test image")
    assert isinstance(info.value, ValueError) and info.value.where == "the test image"


def test_a_reference_without_a_face_falls_back_to_no_alignment(driving_frames):
    hints = extract_motion(driving_frames[:2], np.full((256, 256, 3), 90, np.uint8), resolution=256)
    assert hints.best_frame is None and hints.affine is None
    assert any("reference" in w for w in hints.warnings)
    assert hints.faces_found.all()  # the local hints still come from the (unaligned) driving frames


def test_best_matching_frame_skips_frames_without_landmarks():
    reference = np.zeros((68, 2))
    assert best_matching_frame(reference, [None, np.ones((68, 2)), np.full((68, 2), 0.5), np.full((68, 2), 0.5)]) == 2
    assert best_matching_frame(reference, [None, None]) is None


def test_a_face_missed_before_the_first_detection_is_recovered_backwards(driving_frames, portrait):
    """Tracking used to run forward only: a clip whose first frames the detector misses kept them empty."""
    frames = driving_frames[[5, 4]].copy()
    x0, y0, x1, y1 = (default_face_backend().detect(_copy_256(frames[0]))[0].box * 2).astype(int)
    frames[0, y0 : y0 + int(0.3 * (y1 - y0)), x0:x1] = 0  # brows and forehead hidden: the detector misses
    assert default_face_backend().detect(_copy_256(frames[0])) == []
    hints = extract_motion(frames, portrait, resolution=256, best_frame=-2)
    assert hints.faces_found.tolist() == [True, True] and hints.tracked.tolist() == [True, False]
    assert hints.warnings == ["Driving frame 0: the detector missed the face; it was recovered near a neighbouring "
                              "frame's face."]


def test_a_wide_clip_is_aligned_whatever_its_length(driving_frames, portrait):
    """A 16:9 clip (the sample's middle band, 640x360): stretched to the official square, its faces are squeezed
    to about half their width and the detector misses them. Six frames then had no frame to align on and lost every
    eye/mouth hint, while twelve had one detectable frame whose alignment made every face detectable. The detector
    now looks again on an undistorted copy: both lengths are aligned and keep every hint."""
    wide = np.stack([cv2.resize(f[112:400], (640, 360), interpolation=cv2.INTER_LINEAR) for f in driving_frames[:6]])
    squeezed = [default_face_backend().detect(_copy_256(resize_image(f, 256, 256))) for f in wide]
    assert not any(squeezed), "the premise: the stretched frames' faces are missed"
    hints = extract_motion(wide, portrait, resolution=256)
    assert hints.best_frame is not None and hints.faces_found.all(), hints.warnings


def test_frame_ranges_are_readable():
    from xportrait_core.faces.motion_hints import frame_ranges

    assert frame_ranges([0, 1, 2, 3, 7, 9, 10]) == "0-3, 7, 9-10"
    assert frame_ranges([4]) == "4" and frame_ranges([]) == ""


def test_motion_from_a_streamed_video_matches_motion_from_its_frames(driving_video_path, portrait):
    """The command line's path: the video decoded as it is read (twice, with the best-frame search), hints kept in
    float16; the same hints, rounded, as from the frames held in memory."""
    from xportrait_core.faces.motion_hints import extract_motion
    from xportrait_core.media.video_io import VideoFrames, read_video

    frames, _ = read_video(driving_video_path, max_frames=4)
    held = extract_motion(frames, portrait, 64)
    streamed = extract_motion(VideoFrames(driving_video_path, max_frames=4), portrait, 64, hint_dtype=np.float16)
    assert streamed.global_hint.dtype == np.float16 and streamed.num_frames == 4
    assert streamed.best_frame == held.best_frame
    np.testing.assert_array_equal(streamed.local_boxes, held.local_boxes)
    np.testing.assert_array_equal(streamed.faces_found, held.faces_found)
    np.testing.assert_array_equal(streamed.global_hint, held.global_hint.astype(np.float16))
    np.testing.assert_array_equal(streamed.local_hint, held.local_hint.astype(np.float16))
