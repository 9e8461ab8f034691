"""The command line with awkward files and arguments: checks before any model work, outputs written whole or not at
all (Ctrl-C and SIGTERM included), non-finite numbers refused, truncated videos warned about, memory that stays flat
as the video grows."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from xportrait_core import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo_args(golden_state_dict_path, source_image_path, driving_video_path):
    return ["--weights", str(golden_state_dict_path), "--reference", str(source_image_path),
            "--driving", str(driving_video_path), "--steps", "1"]


@pytest.fixture
def model_never_loads(monkeypatch):
    """Fails the test if the model is loaded: the checks under test must come first."""
    from xportrait_core.model import checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(checkpoint, "load_xportrait", refuse)


def _partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.partial*"))


# ---- checks before any model work -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, message", [
    ("out.gif", "gif format cannot hold H.264"),
    ("out.webm", "webm format cannot hold H.264"),
    ("out", "names no video format"),
    ("out.notavideo", "names no video format"),
    ("missing/out.mp4", "does not exist"),
])
def test_bad_outputs_are_refused_in_under_a_second_before_the_model_loads(
        tmp_path, demo_args, model_never_loads, capsys, name, message):
    import av  # noqa: F401  (the modules' import is the process's start, not the checks' time)
    import PIL.Image  # noqa: F401

    start = time.monotonic()
    code = cli.main(["demo", *demo_args, "-o", str(tmp_path / name)])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2 and f"error: -o" in err and message in err, err
    assert "Traceback" not in err
    assert elapsed < 1.0, f"the check took {elapsed:.2f} s"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even a partial file


def test_the_output_cannot_be_an_input(tmp_path, demo_args, model_never_loads, driving_video_path, capsys):
    driving = tmp_path / "driving.mp4"
    driving.write_bytes(driving_video_path.read_bytes())
    before = driving.read_bytes()
    args = [*demo_args, "--driving", str(driving)]
    # The same file by another spelling is still the same file.
    for output in (driving, tmp_path / "." / "driving.mp4"):
        assert cli.main(["demo", *args, "-o", str(output)]) == 2
        assert "is the same file as --driving" in capsys.readouterr().err
    assert driving.read_bytes() == before


@pytest.mark.parametrize("flag, value, message", [
    ("--guidance", "nan", "--guidance must be a finite number"),
    ("--guidance", "inf", "--guidance must be a finite number"),
    ("--eta", "nan", "--eta must be a finite number"),
    ("--global-strength", "nan", "--global-strength must be a finite number"),
    ("--local-strength", "-5", "--local-strength must be between 0 and 2"),
    ("--global-strength", "2.5", "--global-strength must be between 0 and 2"),
    ("--guidance", "-1", "--guidance must be between 0 and 30"),
    ("--fps", "0", "--fps must be greater than 0"),
    ("--fps", "nan", "--fps must be a finite number"),
    ("--steps", "0", "--steps must be between 1 and 1000"),
    ("--decode-chunk", "0", "--decode-chunk must be at least 1"),
    ("--frames", "0", "--frames must be at least 1"),
    ("--overlap", "16", "--overlap (16) must be smaller than --window (16)"),
    ("--threads", "0", "--threads must be at least 1"),
    ("--device", "bogus", "--device bogus: not a device name"),
    ("--best-frame", "16", "--best-frame 16 is out of range: the run animates 16 driving frames"),
    ("--best-frame", "-3", "--best-frame must be at least -2"),
])
def test_bad_numbers_and_devices_are_refused_before_the_model_loads(
        tmp_path, demo_args, model_never_loads, capsys, flag, value, message):
    out = tmp_path / "o.mp4"
    assert cli.main(["demo", *demo_args, flag, value, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err, err
    assert not out.exists()


def test_cuda_without_a_gpu_is_an_error_line(tmp_path, demo_args, model_never_loads, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks a machine without a CUDA GPU")
    assert cli.main(["demo", *demo_args, "--device", "cuda", "-o", str(tmp_path / "o.mp4")]) == 2
    assert "--device cuda: PyTorch sees no CUDA GPU" in capsys.readouterr().err


def test_unreadable_reference_images_are_error_lines(tmp_path, demo_args, source_image_path, model_never_loads,
                                                     monkeypatch, capsys):
    from PIL import Image

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(source_image_path.read_bytes()[:20000])
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(bomb)
    for path, message in ((not_an_image, "not an image file"), (truncated, "truncated or damaged"),
                          (bomb, "too large to read safely")):
        if path == bomb:
            monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100x100 is more than twice that: a bomb
        assert cli.main(["demo", *demo_args, "--reference", str(path), "-o", str(tmp_path / "o.mp4")]) == 2
        err = capsys.readouterr().err
        assert f"error: --reference {path}" in err and message in err and "Traceback" not in err, err
    missing = tmp_path / "none.png"
    assert cli.main(["demo", *demo_args, "--reference", str(missing), "-o", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "not found" in err


def test_version_is_printed():
    result = subprocess.run([sys.executable, "-m", "xportrait_core", "--version"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    from xportrait_core import __version__

    assert result.returncode == 0 and result.stdout.strip().endswith(__version__)


def test_help_texts_hold_no_measured_figures():
    import re

    parser = cli.build_parser()
    texts = [action.help or "" for sub in parser._subparsers._group_actions[0].choices.values()
             for action in sub._actions]
    measured = [t for t in texts if re.search(r"\d\s*(GiB|GB|MB|ms|s)\b|H100|H200|~\d", t)]
    assert measured == []


def test_torch_threads_follow_the_flag_then_the_environment_then_the_physical_cores(monkeypatch):
    from xportrait_core import cli_checks

    assert cli_checks.torch_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cli_checks.torch_threads(None) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = cli_checks.physical_cores()
    assert cli_checks.torch_threads(None) == cores and 1 <= cores <= (os.cpu_count() or 1)


# ---- results ----------------------------------------------------------------------------------------------------


def test_a_checkpoint_with_a_nan_weight_is_named_and_the_old_output_kept(tmp_path, demo_args,
                                                                        golden_state_dict_path, capsys):
    from safetensors.torch import load_file, save_file

    state = load_file(str(golden_state_dict_path))
    state["model.diffusion_model.out.2.weight"][0, 0, 0, 0] = float("nan")
    damaged = tmp_path / "damaged.safetensors"
    save_file(state, str(damaged))
    out = tmp_path / "o.mp4"
    out.write_bytes(b"the previous result")
    code = cli.main(["demo", *demo_args, "--weights", str(damaged), "--frames", "2", "--quiet", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "NaN or infinite" in err and "model.diffusion_model.out.2.weight" in err and "damaged.safetensors" in err
    assert out.read_bytes() == b"the previous result" and _partials(tmp_path) == []


def test_a_truncated_driving_video_warns_once_with_both_counts(tmp_path, demo_args, driving_video_path, capsys):
    truncated = tmp_path / "cut.mp4"
    data = driving_video_path.read_bytes()
    truncated.write_bytes(data[: len(data) // 12])  # the first few of its 60 frames still decode
    out = tmp_path / "o.mp4"
    assert cli.main(["demo", *demo_args, "--driving", str(truncated), "--frames", "60", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "declares 60 frames" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    decoded = int(warnings[0].split("only ")[1].split()[0])
    assert 0 < decoded < 60
    from xportrait_core.media.video_io import read_video

    assert read_video(out)[0].shape[0] == decoded
    # --quiet quiets warnings too.
    assert cli.main(["demo", *demo_args, "--driving", str(truncated), "--frames", "60", "--quiet",
                     "-o", str(out)]) == 0
    assert capsys.readouterr().err == ""


# ---- outputs written whole or not at all -----------------------------------------------------------------------

# Runs the command line with the decoder slowed after its first chunk: a marker line says writing is under way.
_SLOW_WRITER = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
    from xportrait_core.sampling import pipeline
    original = pipeline.iter_frames
    def slow(*args, **kwargs):
        for index, chunk in enumerate(original(*args, **kwargs)):
            if index == 1:
                print("WRITING", flush=True)
                time.sleep(120)
            yield chunk
    pipeline.iter_frames = slow
    from xportrait_core import cli
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_writing_keeps_the_old_output_byte_identical(tmp_path, demo_args, signum, exit_code):
    out = tmp_path / "result.mp4"
    old = os.urandom(4096)
    out.write_bytes(old)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, "demo", *demo_args, "--frames", "3", "--decode-chunk", "1", "--quiet",
         "-o", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.strip() == "WRITING", process.stderr.read()
        assert len(_partials(tmp_path)) == 1  # the new video is being written beside the old one
        process.send_signal(signum)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    err = process.stderr.read()
    assert code == exit_code, err
    assert "Traceback" not in err
    assert out.read_bytes() == old
    assert _partials(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["result.mp4"]


def test_a_finished_output_replaces_the_old_one_with_ordinary_permissions(tmp_path, demo_args):
    out = tmp_path / "result.mp4"
    out.write_bytes(b"old")
    assert cli.main(["demo", *demo_args, "--frames", "2", "--quiet", "-o", str(out)]) == 0
    from xportrait_core.media.video_io import read_video

    assert read_video(out)[0].shape == (2, 64, 64, 3)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert _partials(tmp_path) == []


# ---- convert ------------------------------------------------------------------------------------------------------


def test_convert_refuses_other_suffixes_its_own_input_and_missing_folders(tmp_path, golden_state_dict_path, capsys):
    source = tmp_path / "model.safetensors"
    source.write_bytes(golden_state_dict_path.read_bytes())
    before = source.read_bytes()
    for output, message in ((tmp_path / "out.th", "name the output *.safetensors"),
                            (source, "is the same file as the input"),
                            (tmp_path / "missing" / "out.safetensors", "does not exist")):
        assert cli.main(["convert", str(source), str(output)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_convert_writes_through_a_temporary_file(tmp_path, golden_state_dict_path, monkeypatch):
    from xportrait_core.model import checkpoint

    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    seen = []

    def interrupted(tensors, filename, metadata=None):
        seen.append(Path(filename))
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.convert_checkpoint(golden_state_dict_path, out)
    assert seen and seen[0].parent == tmp_path and seen[0] != out
    assert out.read_bytes() == b"old" and _partials(tmp_path) == []


# ---- memory -------------------------------------------------------------------------------------------------------


def _full_hd_driving_video(source: Path, target: Path, frames: int) -> None:
    """The sample's frames stretched to 1920x1080: frames that cost 6 MB each when decoded, so holding a video
    whole shows in the peak memory while the tiny model's own needs stay small."""
    import av
    import cv2

    with av.open(str(source)) as src:
        stream = src.streams.video[0]
        rate = stream.average_rate
        images = [f.to_ndarray(format="rgb24") for _, f in zip(range(frames), src.decode(stream))]
    with av.open(str(target), "w") as out:
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = 1920, 1080, "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "30"}
        for index in range(frames):
            big = cv2.resize(images[index % len(images)], (1920, 1080), interpolation=cv2.INTER_NEAREST)
            out.mux(video.encode(av.VideoFrame.from_ndarray(big, format="rgb24")))
        out.mux(video.encode())


_PEAK_RSS = textwrap.dedent("""
    import resource, subprocess, sys
    result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    sys.stderr.write(result.stderr)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    sys.exit(result.returncode)
""")


def _peak_rss_kib(args: list[str], cwd: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "xportrait_core", *args],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


def test_peak_memory_stays_flat_with_ten_times_the_frames(tmp_path, golden_state_dict_path, source_image_path,
                                                         driving_video_path):
    driving = tmp_path / "full_hd.mp4"
    _full_hd_driving_video(driving_video_path, driving, frames=60)
    common = ["demo", "--weights", str(golden_state_dict_path), "--reference", str(source_image_path),
              "--driving", str(driving), "--steps", "1", "--best-frame", "-2", "--quiet"]
    short = _peak_rss_kib([*common, "--frames", "6", "-o", "short.mp4"], tmp_path)
    long = _peak_rss_kib([*common, "--frames", "60", "-o", "long.mp4"], tmp_path)
    # Held whole, the 54 extra decoded frames alone would add about 335 MB to a run of well under 1 GB.
    assert long < 1.5 * short, f"peak RSS {long / 1024:.0f} MiB for 60 frames vs {short / 1024:.0f} MiB for 6"
    assert long - short < 100 * 1024, f"peak RSS grew by {(long - short) / 1024:.0f} MiB for 54 more frames"


def test_a_face_warning_is_printed_once_and_quiet_quiets_it(tmp_path, demo_args, driving_video_path, capsys):
    import av

    from xportrait_core.media.video_io import read_video

    frames, _ = read_video(driving_video_path, max_frames=2)
    driving = tmp_path / "with_blank.mp4"
    with av.open(str(driving), "w") as out:
        stream = out.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 512, 512, "yuv420p"
        for image in (*frames, np.full_like(frames[0], 128)):  # the last frame shows no face
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    args = ["demo", *demo_args, "--driving", str(driving), "--frames", "3", "-o", str(tmp_path / "o.mp4")]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "driving frame 2" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: No face was found in driving frame 2"), err
    assert cli.main([*args, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
