"""Identity metric: dlib descriptor distances to the reference and to the driving frames, summary and plot."""
from __future__ import annotations

import numpy as np
import pytest

from xportrait_core.faces.identity import (
    IdentityReport,
    cosine_similarity,
    descriptor_distance,
    face_descriptor,
    measure_identity,
    plot_identity,
)
from xportrait_core.faces.landmarks import NoFaceFoundError


@pytest.fixture(scope="session")
def two_driving_frames(driving_frames) -> np.ndarray:
    return driving_frames[[0, 20]]


@pytest.fixture(scope="session")
def report(portrait, two_driving_frames) -> IdentityReport:
    """Outputs: two frames of the driving actor and one without a face; 'driving' frames are the actor too."""
    blank = np.full((512, 512, 3), 128, np.uint8)
    outputs = np.stack([two_driving_frames[0], two_driving_frames[1], blank])
    driving = np.stack([two_driving_frames[1], two_driving_frames[0], two_driving_frames[0]])
    return measure_identity(portrait, outputs, driving_frames=driving)


def test_two_frames_of_one_person_are_closer_than_another_person(portrait, two_driving_frames):
    reference = face_descriptor(portrait, "the reference")
    a = face_descriptor(two_driving_frames[0], "frame 0")
    b = face_descriptor(two_driving_frames[1], "frame 20")
    assert reference.shape == (128,) and reference.dtype == np.float32
    same = float(descriptor_distance(a, b))
    other = float(descriptor_distance(reference, a))
    assert same == pytest.approx(0.31, abs=0.05)  # measured 0.31
    assert other == pytest.approx(0.81, abs=0.05)  # measured 0.79-0.83 across the video
    assert same < 0.6 < other  # dlib's same-person cut separates them
    assert cosine_similarity(a, b) > cosine_similarity(reference, a)


def test_the_reference_matches_itself(portrait):
    self_report = measure_identity(portrait, portrait[None])
    assert self_report.reference_distance[0] < 1e-5
    assert self_report.reference_cosine[0] == pytest.approx(1.0, abs=1e-6)
    assert self_report.frames_over_threshold == []


def test_report_per_frame_and_summary(report):
    assert report.num_frames == 3
    assert report.output_faces_found.tolist() == [True, True, False]
    assert report.missing_frames == [2]
    assert np.isnan(report.reference_distance[2]) and np.isnan(report.driving_distance[2])
    assert (report.reference_distance[:2] > 0.7).all()
    np.testing.assert_allclose(report.driving_distance[:2], 0.31, atol=0.05)
    assert report.frames_over_threshold == [0, 1]
    assert report.frames_closer_to_driving == [0, 1]  # the 'outputs' are the actor: full leakage
    assert report.worst_frame == int(np.argmax(report.reference_distance[:2]))
    assert report.mean_distance == pytest.approx(float(report.reference_distance[:2].mean()))
    summary = report.summary()
    assert summary["missing_frames"] == [2] and summary["threshold"] == 0.6
    assert summary["mean_driving_distance"] == pytest.approx(float(report.driving_distance[:2].mean()))
    text = report.summary_text()
    assert "no face found in 1 frame [2]: left out of the mean" in text and "worst frame" in text


def test_the_threshold_is_settable(portrait, two_driving_frames):
    strict = measure_identity(portrait, two_driving_frames, threshold=0.9)
    assert strict.frames_over_threshold == [] and strict.driving_distance is None
    assert strict.frames_closer_to_driving == []


def test_plot_draws_the_curves(report):
    image = plot_identity(report, width=640, height=240)
    assert image.shape == (240, 640, 3) and image.dtype == np.uint8
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert (31, 119, 180) in colours  # reference curve
    assert (255, 127, 14) in colours  # driving curve
    assert (214, 39, 40) in colours  # threshold line
    assert (127, 127, 127) in colours  # the frame with no face is marked
    with pytest.raises(ValueError, match="plot size"):
        plot_identity(report, width=50, height=50)


def test_all_frames_without_faces_are_reported_not_fatal(portrait):
    blank = np.zeros((2, 128, 128, 3), np.float32)
    empty = measure_identity(portrait, blank)
    assert empty.missing_frames == [0, 1] and empty.worst_frame is None and np.isnan(empty.mean_distance)
    assert plot_identity(empty).shape == (320, 768, 3)


def test_bad_inputs_give_clear_errors(portrait, two_driving_frames):
    with pytest.raises(NoFaceFoundError, match="No face was found in the reference image"):
        measure_identity(np.full((200, 200, 3), 50, np.uint8), two_driving_frames)
    with pytest.raises(ValueError, match="empty"):
        measure_identity(portrait, np.zeros((0, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="driving frames"):
        measure_identity(portrait, two_driving_frames, driving_frames=two_driving_frames[:1])
