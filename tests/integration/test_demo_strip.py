"""The demo's strip: beside the video, one PNG of what the run computed (reference, hints, output, identity plot)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xportrait_core import cli
from xportrait_core.demo_strip import CAPTION, GAP, TILE, pick_frames, result_strip, strip_path, write_png
from xportrait_core.media.video_io import read_video


def test_frames_are_picked_evenly_from_first_to_last():
    assert pick_frames(16) == [0, 5, 10, 15]
    assert pick_frames(6) == [0, 2, 3, 5]
    assert pick_frames(2) == [0, 1] and pick_frames(1) == [0]
    with pytest.raises(ValueError):
        pick_frames(0)


def test_strip_places_each_picture_in_its_tile():
    reference = np.zeros((64, 64, 3), np.float32)
    reference[:, 32:] = 1.0  # left half black, right half white
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    strip = result_strip(reference, [("first", [red, red]), ("second", [np.full((64, 64, 3), 0.5, np.float32)])],
                         "reference", plot=np.zeros((50, 100, 3), np.uint8), plot_caption="plot")
    columns = 3
    assert strip.shape[1] == columns * TILE + (columns + 1) * GAP
    top = GAP + CAPTION
    tile = strip[top:top + TILE, GAP:GAP + TILE]
    # The reference, enlarged without blurring: its halves stay pure black and white.
    assert (tile[:, :TILE // 2 - 1] == 0).all() and (tile[:, TILE // 2 + 1:] == 255).all()
    second_column = GAP + 2 * (TILE + GAP)
    assert (strip[top:top + TILE, second_column:second_column + TILE] == [255, 0, 0]).all()
    below = top + TILE + GAP + CAPTION
    assert abs(int(strip[below + TILE // 2, GAP + TILE + GAP + TILE // 2, 0]) - 128) <= 1  # 0.5 grey
    plot_top = GAP + 2 * (CAPTION + TILE + GAP) + CAPTION
    assert (strip[plot_top + 5:-GAP - 5, GAP + 5:-GAP - 5] == 0).all()  # the (black) plot, scaled to the width


def test_png_is_written_under_a_temporary_name_then_renamed(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = write_png(tmp_path / "out_strip.png", image)
    assert path == tmp_path / "out_strip.png" and [p.name for p in tmp_path.iterdir()] == ["out_strip.png"]
    with Image.open(path) as written:
        assert np.array_equal(np.asarray(written), image)
    assert strip_path(tmp_path / "clip.mp4") == tmp_path / "clip_strip.png"


def test_demo_writes_the_strip_beside_its_video(tmp_path, golden_state_dict_path, source_image_path,
                                                driving_video_path, capsys):
    out = tmp_path / "demo.mp4"
    code = cli.main(["demo", "-o", str(out), "--weights", str(golden_state_dict_path),
                     "--reference", str(source_image_path), "--driving", str(driving_video_path),
                     "--frames", "6", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    strip_file = tmp_path / "demo_strip.png"
    assert f"wrote {strip_file}" in err
    with Image.open(strip_file) as opened:
        strip = np.asarray(opened.convert("RGB"))
    output, _ = read_video(out)
    row = CAPTION + TILE + GAP  # one row of tiles with its caption

    def tile(row_index: int, column: int) -> np.ndarray:
        top, left = GAP + row_index * row + CAPTION, GAP + column * (TILE + GAP)
        return strip[top:top + TILE, left:left + TILE]

    for column, index in enumerate(pick_frames(len(output)), start=1):
        # Row 4: the output frames, read back from the video and enlarged 2x without blurring.
        assert np.array_equal(tile(3, column)[::2, ::2], output[index])
        # Row 3: a local hint: eye and mouth patches on black (the hint's -1), so mostly black, not all.
        black = (tile(2, column).max(axis=-1) == 0).mean()
        assert 0.4 < black < 0.98, black
        # Row 2: a global hint: the aligned driving frame, an image with its own detail.
        assert tile(1, column).std() > 20
    assert strip.shape[0] > GAP + 4 * row + 100  # the identity plot below the tiles
