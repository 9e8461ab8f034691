"""Reference preparation (crop around the face / official resize) and paste-back into the full photo."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xportrait_core.faces.landmarks import NoFaceFoundError
from xportrait_core.faces.paste_back import paste_back, paste_frame, paste_mask
from xportrait_core.faces.reference_crop import (
    prepare_reference,
    prepare_references,
    stack_references,
)

# where the sample portrait is placed inside a larger synthetic photo
PLACE_X, PLACE_Y = 500, 200


@pytest.fixture(scope="session")
def photo(portrait) -> np.ndarray:
    """A 1400x900 photo with the portrait pasted off-centre on a textured background."""
    rng = np.random.default_rng(1)
    canvas = rng.integers(60, 100, (900, 1400, 3), dtype=np.uint8)
    canvas[PLACE_Y : PLACE_Y + 512, PLACE_X : PLACE_X + 512] = portrait
    return canvas


@pytest.fixture(scope="session")
def prepared(photo):
    return prepare_reference(photo, resolution=256, margin=0.3)


def test_the_face_is_found_and_cropped_square(prepared, photo):
    x0, y0, x1, y1 = prepared.crop_box
    assert x1 - x0 == y1 - y0  # square
    assert 0 <= x0 and 0 <= y0 and x1 <= photo.shape[1] and y1 <= photo.shape[0]
    assert prepared.source_size == (900, 1400)
    assert prepared.image.shape == (256, 256, 3) and prepared.image.dtype == np.float32
    assert 0.0 <= prepared.image.min() and prepared.image.max() <= 1.0
    # the crop sits on the portrait's face, well inside the portrait
    assert PLACE_X < x0 < x1 < PLACE_X + 512 and PLACE_Y < y0 < y1 < PLACE_Y + 512
    landmarks = prepared.landmarks
    assert landmarks.shape == (68, 2)
    assert (landmarks.min(0) >= [x0, y0]).all() and (landmarks.max(0) <= [x1, y1]).all()
    crop_landmarks = prepared.landmarks_in_crop
    assert (crop_landmarks >= 0).all() and (crop_landmarks < 256).all()
    # the model input is the crop, resized
    crop = photo[y0:y1, x0:x1].astype(np.float32) / 255
    small = np.array(Image.fromarray(photo[y0:y1, x0:x1]).resize((256, 256), Image.BILINEAR), np.float32) / 255
    assert np.abs(prepared.image - small).mean() < 0.02 and crop.shape[0] > 256


def test_default_margin_reproduces_the_sample_framing(photo):
    """On the official sample the default crop is (nearly) the portrait itself, as the model was trained on."""
    x0, y0, x1, _ = prepare_reference(photo, resolution=256).crop_box
    assert abs((x1 - x0) - 512) <= 32
    assert abs(x0 - PLACE_X) <= 16 and abs(y0 - PLACE_Y) <= 16


def test_margin_sets_the_crop_size(photo):
    sides = [prepare_reference(photo, 64, margin=m).crop_box for m in (0.0, 0.3, 0.8)]
    widths = [b[2] - b[0] for b in sides]
    assert widths[0] < widths[1] < widths[2]
    assert widths[2] / widths[0] == pytest.approx(2.6, rel=0.02)  # (1 + 2 * 0.8) / (1 + 0)


def test_a_crop_near_the_border_stays_inside(portrait):
    crop = prepare_reference(portrait[:, 60:], resolution=128, margin=1.0)  # 452 wide: the square must shrink
    x0, y0, x1, y1 = crop.crop_box
    assert (x1 - x0) == (y1 - y0) == 452 and x0 == 0 and x1 == 452 and 0 <= y0 and y1 <= 512


def test_resize_mode_is_the_official_stretch(photo):
    resized = prepare_reference(photo, resolution=128, mode="resize")
    assert resized.crop_box == (0, 0, 1400, 900) and resized.mode == "resize"
    assert resized.image.shape == (128, 128, 3)
    assert resized.face is not None  # found even though it is not needed
    blank = prepare_reference(np.full((90, 160, 3), 7, np.uint8), resolution=64, mode="resize")
    assert blank.face is None and blank.landmarks is None


def test_gray_rgba_and_float_inputs(portrait):
    rgb = prepare_reference(portrait, resolution=128)
    gray = prepare_reference(portrait.mean(2).astype(np.uint8), resolution=128)
    rgba = prepare_reference(np.dstack([portrait, np.full(portrait.shape[:2], 255, np.uint8)]), resolution=128)
    as_float = prepare_reference(portrait.astype(np.float32) / 255, resolution=128)
    assert gray.image.shape == (128, 128, 3) and np.allclose(gray.image[..., 0], gray.image[..., 2])
    np.testing.assert_allclose(rgba.image, rgb.image, atol=1e-6)
    np.testing.assert_allclose(as_float.image, rgb.image, atol=1e-6)
    for prepared in (gray, rgba, as_float):
        assert np.abs(np.array(prepared.crop_box) - np.array(rgb.crop_box)).max() <= 8


def test_a_batch_of_references(portrait, photo):
    batch = prepare_references([portrait, photo], resolution=128)
    assert [b.source_size for b in batch] == [(512, 512), (900, 1400)]
    stacked = stack_references(batch)
    assert stacked.shape == (2, 128, 128, 3) and stacked.dtype == np.float32
    as_array = prepare_references(np.stack([portrait, portrait[:, ::-1]]), resolution=128)
    assert len(as_array) == 2


def test_an_image_without_a_face_says_so(portrait):
    with pytest.raises(NoFaceFoundError, match="No face was found in the reference image"):
        prepare_reference(np.full((300, 300, 3), 128, np.uint8))
    with pytest.raises(NoFaceFoundError, match="reference image 2 of 2"):
        prepare_references([portrait, np.zeros((200, 300), np.uint8)], resolution=64)


def test_bad_inputs_give_clear_errors(portrait):
    with pytest.raises(ValueError, match="empty"):
        prepare_references([])
    with pytest.raises(ValueError, match="empty"):
        prepare_references(np.zeros((0, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        stack_references([])
    with pytest.raises(ValueError, match="multiple of 64"):
        prepare_reference(portrait, resolution=100)
    with pytest.raises(ValueError, match="mode"):
        prepare_reference(portrait, mode="zoom")
    with pytest.raises(ValueError, match="margin"):
        prepare_reference(portrait, margin=-0.1)
    with pytest.raises(ValueError, match="shape"):
        prepare_reference(np.zeros((4, 4, 5), np.uint8))


def test_paste_back_of_an_unchanged_crop_reproduces_the_photo_outside_the_feather_band(prepared, photo):
    frames = np.stack([prepared.image, prepared.image])
    pasted = paste_back(frames, prepared, feather=24)
    assert pasted.frames.shape == (2, 900, 1400, 3) and pasted.frames.dtype == np.float32
    assert pasted.mask.shape == (1, 900, 1400)
    mask = pasted.mask[0]
    source = photo.astype(np.float32) / 255
    outside = mask == 0
    assert outside.sum() > 900 * 1400 - (prepared.crop_box[2] - prepared.crop_box[0]) ** 2 - 1
    for frame in pasted.frames:
        np.testing.assert_array_equal(frame[outside], source[outside])  # bit for bit
        inside = mask == 1
        assert np.abs(frame[inside] - source[inside]).mean() < 0.01  # resampled twice, otherwise the same


def test_the_mask_feathers_inward_from_the_crop_edge(prepared):
    x0, y0, x1, y1 = prepared.crop_box
    mask = paste_mask(prepared, feather=24)
    assert mask.min() == 0.0 and mask.max() == 1.0
    assert (mask[:y0] == 0).all() and (mask[y1:] == 0).all() and (mask[:, :x0] == 0).all() and (mask[:, x1:] == 0).all()
    middle_row = mask[(y0 + y1) // 2, x0:x1]
    assert 0 < middle_row[0] < 0.01 and (np.diff(middle_row[:24]) > 0).all()  # rises across the band
    assert (middle_row[24:-24] == 1).all()
    hard = paste_mask(prepared, feather=0)
    assert hard[y0:y1, x0:x1].min() == 1.0 and hard.sum() == (x1 - x0) * (y1 - y0)


def test_no_feather_where_the_crop_touches_the_photo_border(portrait):
    prepared = prepare_reference(portrait, resolution=128)  # the sample crop spans the whole portrait
    assert prepared.crop_box == (0, 0, 512, 512)
    mask = paste_mask(prepared, feather=20)
    assert (mask == 1).all()
    left = prepare_reference(portrait[:, 60:], resolution=128, margin=1.0)  # touches left, right and one more side
    _, y0, x1, y1 = left.crop_box
    mask = paste_mask(left, feather=20)
    assert mask[(y0 + y1) // 2, 0] == 1.0 and mask[(y0 + y1) // 2, x1 - 1] == 1.0
    full = prepare_reference(portrait, resolution=128, mode="resize")
    assert (paste_mask(full, feather=20) == 1).all()  # the whole photo is animated


def test_a_changed_crop_replaces_the_face_region(prepared, photo):
    white = np.ones((1, 512, 512, 3), np.float32)  # another output size than the prepared 256
    pasted = paste_back(white, prepared, feather=10)
    mask = pasted.mask[0]
    frame = pasted.frames[0]
    source = photo.astype(np.float32) / 255
    np.testing.assert_allclose(frame[mask == 1], 1.0, atol=1e-6)
    np.testing.assert_array_equal(frame[mask == 0], source[mask == 0])
    band = (mask > 0) & (mask < 1)
    expected = source[band] + mask[band][:, None] * (1.0 - source[band])
    np.testing.assert_allclose(frame[band], expected, atol=1e-5)
    uint8 = paste_frame((white[0] * 255).astype(np.uint8), prepared, mask)
    np.testing.assert_allclose(uint8, frame, atol=1e-6)


def test_paste_back_bad_inputs(prepared):
    with pytest.raises(ValueError, match="empty"):
        paste_back(np.zeros((0, 256, 256, 3), np.float32), prepared)
    with pytest.raises(ValueError, match="feather"):
        paste_back(prepared.image[None], prepared, feather=-3)
    with pytest.raises(ValueError, match="mask"):
        paste_frame(prepared.image, prepared, np.zeros((10, 10), np.float32))
