"""Video reading and writing through PyAV (H.264 mp4), no system ffmpeg."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from xportrait_core.media.video_io import read_video, write_video


def _moving_square(n: int = 12, height: int = 64, width: int = 96) -> np.ndarray:
    frames = np.full((n, height, width, 3), 40, np.uint8)
    for i in range(n):
        frames[i, 16:40, 4 + 5 * i : 28 + 5 * i] = 220
    return frames


def test_read_the_sample_video(driving_video_path):
    frames, fps = read_video(driving_video_path)
    assert frames.shape == (60, 512, 512, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(12000 / 1001)
    assert frames.std() > 20  # real content, not a blank decode
    first, _ = read_video(driving_video_path, max_frames=3)
    np.testing.assert_array_equal(first, frames[:3])


def test_round_trip(tmp_path):
    frames = _moving_square()
    path = write_video(tmp_path / "out" / "clip.mp4", frames, fps=12000 / 1001)
    assert path.is_file()
    back, fps = read_video(path)
    assert back.shape == frames.shape
    assert fps == pytest.approx(12000 / 1001)
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 3.0
    # the square moves: frames are not duplicated or reordered
    columns = [np.flatnonzero(f[28, :, 0] > 128)[0] for f in back]
    assert np.all(np.abs(np.array(columns) - (4 + 5 * np.arange(12))) <= 1)


def test_frames_can_come_from_a_generator(tmp_path):
    frames = _moving_square()
    produced = []

    def one_at_a_time():
        for frame in frames:
            produced.append(len(produced))
            yield frame

    write_video(tmp_path / "gen.mp4", one_at_a_time(), fps=12)
    from_array = write_video(tmp_path / "arr.mp4", frames, fps=12)
    back, _ = read_video(tmp_path / "gen.mp4")
    assert len(produced) == len(frames)
    np.testing.assert_array_equal(back, read_video(from_array)[0])  # same encoder input, same file content


def test_float_gray_and_odd_sizes(tmp_path):
    frames = _moving_square(4, 63, 95).astype(np.float32) / 255
    write_video(tmp_path / "a.mp4", frames, fps=25)
    back, fps = read_video(tmp_path / "a.mp4")
    assert back.shape == (4, 64, 96, 3) and fps == 25.0  # padded to even sizes for yuv420p
    np.testing.assert_allclose(back[:, 63, :95], back[:, 62, :95], atol=6)  # the padding repeats the edge
    gray = _moving_square(3)[..., 0]
    write_video(tmp_path / "g.mp4", gray, fps=Fraction(30000, 1001))
    back, fps = read_video(tmp_path / "g.mp4")
    assert back.shape == (3, 64, 96, 3) and fps == pytest.approx(29.97, abs=0.01)


def test_display_rotation_is_applied(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "rotated.mp4"
    image = np.zeros((32, 64, 3), np.uint8)
    image[:8, :8] = 255  # a white block top-left
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # counter-clockwise
        for _ in range(2):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    upright, _ = read_video(path)
    assert upright.shape == (2, 64, 32, 3)
    assert upright[0, -6:, :6].mean() > 200 and upright[0, :6, :6].mean() < 60  # top-left went to bottom-left
    stored, _ = read_video(path, apply_rotation=False)
    assert stored.shape == (2, 32, 64, 3)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video")
    with pytest.raises(ValueError, match="junk.mp4"):
        read_video(junk)
    with pytest.raises(ValueError, match="empty"):
        write_video(tmp_path / "e.mp4", np.zeros((0, 8, 8, 3), np.uint8), fps=10)
    with pytest.raises(ValueError, match="empty"):
        write_video(tmp_path / "e.mp4", [], fps=10)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "f.mp4", _moving_square(2), fps=0)
    with pytest.raises(ValueError, match="shape"):
        write_video(tmp_path / "s.mp4", np.zeros((2, 8, 8, 4), np.uint8), fps=10)
    with pytest.raises(ValueError, match="frame 1"):
        write_video(tmp_path / "m.mp4", [np.zeros((8, 8, 3), np.uint8), np.zeros((10, 8, 3), np.uint8)], fps=10)


def test_the_driving_videos_sound_goes_under_the_frames_for_as_long_as_they_last(tmp_path, driving_video_path):
    from media import sound_of, video_with_sound

    talking = tmp_path / "talking.mp4"
    video_with_sound(driving_video_path, talking, frames=12, tone_hz=440.0)  # 1 s at 12 fps
    frames = np.random.default_rng(0).integers(0, 255, size=(6, 32, 32, 3), dtype=np.uint8)
    out = write_video(tmp_path / "out.mp4", frames, fps=12.0, audio_from=talking)
    samples, rate = sound_of(out)
    assert abs(len(samples) / rate - 0.5) < 0.03  # 6 frames at 12 fps, not the source's whole second
    spectrum = np.abs(np.fft.rfft(samples[int(0.05 * rate):]))
    assert np.fft.rfftfreq(len(samples) - int(0.05 * rate), 1 / rate)[spectrum.argmax()] == pytest.approx(440, abs=5)
    assert read_video(out)[0].shape == (6, 32, 32, 3)
    # A source without sound adds none.
    silent = write_video(tmp_path / "silent.mp4", frames, fps=12.0, audio_from=driving_video_path)
    assert sound_of(silent) is None


def test_a_truncated_file_warns_with_both_counts_and_gives_the_frames_that_decode(tmp_path, driving_video_path,
                                                                                  caplog):
    from xportrait_core.media.video_io import VideoFrames, iter_video

    data = driving_video_path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])
    with caplog.at_level("WARNING"):
        frames = list(iter_video(cut))
    assert 0 < len(frames) < 60
    [record] = [r for r in caplog.records if "declares" in r.getMessage()]
    assert f"declares 60 frames but only {len(frames)} could be decoded" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING"):
        list(iter_video(driving_video_path))  # a whole file says nothing
        source = VideoFrames(cut)
        assert len(source) == len(frames)  # the frames that decode, not the 60 declared
        assert sum(1 for _ in source) == sum(1 for _ in source) == len(frames)  # re-iterable
        np.testing.assert_array_equal(source[len(frames) - 1], frames[-1])
    assert len([r for r in caplog.records if "declares" in r.getMessage()]) == 1  # warned once per source


def test_video_frames_decode_in_order_anew_each_pass_and_match_read_video(driving_video_path):
    from xportrait_core.media.video_io import VideoFrames

    whole, fps = read_video(driving_video_path, max_frames=5)
    source = VideoFrames(driving_video_path, max_frames=5)
    assert len(source) == 5 and source.fps == fps
    for _ in range(2):
        np.testing.assert_array_equal(np.stack(list(source)), whole)
    # Indexed in order, the current frame again, then back to an earlier one (decoded from the start again).
    for index in (0, 1, 1, 3, 2, 4, -1):
        np.testing.assert_array_equal(source[index], whole[index])
    with pytest.raises(IndexError):
        source[5]
    source.close()


def test_an_error_while_writing_leaves_the_previous_file_and_no_partial(tmp_path):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"previous")

    def breaks_after_two():
        yield from _moving_square(2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_video(target, breaks_after_two(), fps=12)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
    write_video(target, _moving_square(3), fps=12)
    assert read_video(target)[0].shape[0] == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_sound_from_samples_goes_under_the_frames(tmp_path):
    from media import sound_of

    from xportrait_core.media.video_io import AudioSamples

    rate = 22050
    tone = 0.4 * np.sin(2 * np.pi * 330 * np.arange(3 * rate) / rate)
    stereo = np.stack([tone, tone]).astype(np.float32)
    out = write_video(tmp_path / "s.mp4", _moving_square(10), fps=10.0, audio_from=AudioSamples(stereo, rate))
    samples, out_rate = sound_of(out)
    assert abs(len(samples) / out_rate - 1.0) < 0.03  # as long as the 10 frames at 10 fps, not the 3 s given
    spectrum = np.abs(np.fft.rfft(samples[int(0.05 * out_rate):]))
    freqs = np.fft.rfftfreq(len(samples) - int(0.05 * out_rate), 1 / out_rate)
    assert freqs[spectrum.argmax()] == pytest.approx(330, abs=5)


def test_video_frames_count_a_container_that_declares_no_frames(tmp_path):
    from xportrait_core.media.video_io import VideoFrames, probe_video

    path = write_video(tmp_path / "clip.mkv", _moving_square(7), fps=12)  # Matroska declares no frame count
    assert probe_video(path).declared_frames == 0
    source = VideoFrames(path)
    assert len(source) == 7 and len(list(source)) == 7
    assert len(VideoFrames(path, max_frames=3)) == 3
