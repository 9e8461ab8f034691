"""The command line: arguments and defaults, the checkpoint search and its message, and real runs with tiny weights."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xportrait_core import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(cli.CHECKPOINT_ENV, raising=False)
    monkeypatch.delenv(cli.MODELS_DIR_ENV, raising=False)


def test_animate_defaults_are_the_official_ones():
    args = cli.build_parser().parse_args(["animate", "--reference", "a.png", "--driving", "b.mp4", "-o", "c.mp4"])
    assert (args.steps, args.guidance, args.overlap, args.window, args.seed) == (30, 5.0, 4, 16, 999)
    assert (args.best_frame, args.eta, args.spacing, args.init) == (-1, 0.0, "uniform", "reference")
    assert (args.resolution, args.reference_mode, args.frames, args.checkpoint) == (512, "resize", None, None)
    assert (args.device, args.dtype, args.decode_chunk) == ("auto", "auto", 4)  # decode chunk: memory only, frames identical
    assert args.crf == 18


def test_animate_options_parse():
    args = cli.build_parser().parse_args([
        "animate", "--reference", "a.png", "--driving", "b.mp4", "-o", "c.mp4", "--checkpoint", "w.th",
        "--steps", "8", "--guidance", "3.5", "--overlap", "2", "--seed", "7", "--frames", "40", "--resolution", "256",
        "--device", "cpu", "--dtype", "bf16", "--best-frame", "-2", "--spacing", "evenly", "--init", "noise",
        "--crf", "0",
    ])
    assert args.crf == 0
    assert (args.steps, args.guidance, args.overlap, args.seed, args.frames, args.resolution) == (8, 3.5, 2, 7, 40, 256)
    assert (args.checkpoint, args.device, args.dtype, args.best_frame) == ("w.th", "cpu", "bf16", -2)
    assert (args.spacing, args.init) == ("evenly", "noise")


@pytest.mark.parametrize("argv", [
    [],
    ["animate", "--driving", "b.mp4", "-o", "c.mp4"],           # no reference
    ["animate", "--reference", "a.png", "--driving", "b.mp4"],  # no output
    ["animate", "--reference", "a.png", "--driving", "b.mp4", "-o", "c.mp4", "--dtype", "fp8"],
    ["convert", "only_input.th"],
    ["animate", "--reference", "a.png", "--driving", "b.mp4", "-o", "c.mp4", "--crf", "52"],
    ["animate", "--reference", "a.png", "--driving", "b.mp4", "-o", "c.mp4", "--crf", "high"],
])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_checkpoint_search_order(tmp_path, monkeypatch, no_env):
    explicit = tmp_path / "explicit.th"
    explicit.write_bytes(b"x")
    env_file = tmp_path / "env.safetensors"
    env_file.write_bytes(b"x")
    folder = tmp_path / "work" / "models" / "xportrait"
    folder.mkdir(parents=True)
    in_folder = folder / "model_state-415001.th"
    in_folder.write_bytes(b"x")
    cwd = tmp_path / "work"
    assert cli.find_checkpoint(str(explicit), cwd=cwd) == explicit
    assert cli.find_checkpoint(None, cwd=cwd) == in_folder
    monkeypatch.setenv(cli.CHECKPOINT_ENV, str(env_file))
    assert cli.find_checkpoint(None, cwd=cwd) == env_file
    assert cli.find_checkpoint(str(explicit), cwd=cwd) == explicit
    monkeypatch.delenv(cli.CHECKPOINT_ENV)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.safetensors").write_bytes(b"x")
    monkeypatch.setenv(cli.MODELS_DIR_ENV, str(other))
    assert cli.find_checkpoint(None, cwd=cwd) == other / "a.safetensors"


def test_checkpoint_search_errors(tmp_path, no_env):
    with pytest.raises(cli.CheckpointNotFound, match="--checkpoint points at .*missing.th"):
        cli.find_checkpoint(str(tmp_path / "missing.th"), cwd=tmp_path)
    folder = tmp_path / "models" / "xportrait"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(cli.CheckpointNotFound) as info:
        cli.find_checkpoint(None, cwd=tmp_path)
    message = str(info.value)
    assert "model_state-415001.th" in message and str(folder) in message
    assert "--checkpoint" in message and cli.CHECKPOINT_ENV in message
    (folder / "a.th").write_bytes(b"x")
    (folder / "b.safetensors").write_bytes(b"x")
    with pytest.raises(cli.CheckpointNotFound, match="several checkpoints"):
        cli.find_checkpoint(None, cwd=tmp_path)


def test_animate_without_weights_says_where_to_put_them(tmp_path, monkeypatch, no_env, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["animate", "--reference", "a.png", "--driving", "b.mp4", "-o", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert code == 2
    assert "no X-Portrait checkpoint found" in err and str(tmp_path / "models" / "xportrait") in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.mp4").exists()


def test_progress_bar_writes_a_line_per_tenth_to_logs():
    stream = io.StringIO()
    bar = cli.ProgressBar("sampling", stream=stream)
    for done in range(1, 101):
        bar(done, 100)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("sampling") and "100/100" in lines[-1]
    quiet = io.StringIO()
    cli.ProgressBar("x", stream=quiet, enabled=False)(1, 1)
    assert quiet.getvalue() == ""


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "xportrait_core", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for command in ("animate", "demo", "convert"):
        assert command in result.stdout


def test_main_defaults_the_cuda_allocator_to_expandable_segments_and_keeps_a_users_setting(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == cli.DEFAULT_CUDA_ALLOC_CONF == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"


def _read_frames(path):
    from xportrait_core.media.video_io import read_video

    return read_video(path)


def test_demo_writes_an_mp4_with_one_frame_per_driving_frame(tmp_path, golden_state_dict_path, source_image_path,
                                                             driving_video_path, capsys):
    out = tmp_path / "demo.mp4"
    code = cli.main(["demo", "-o", str(out), "--weights", str(golden_state_dict_path),
                     "--reference", str(source_image_path), "--driving", str(driving_video_path),
                     "--frames", "6", "--steps", "2", "--fps", "10", "--decode-chunk", "4"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "sampling" in err and "wrote" in err  # progress was shown
    frames, fps = _read_frames(out)
    assert frames.shape == (6, 64, 64, 3)
    assert fps == pytest.approx(10.0)
    assert frames.std() > 1.0  # not a blank video


def test_the_output_keeps_the_driving_videos_sound_unless_the_frame_rate_changes(
        tmp_path, golden_state_dict_path, source_image_path, driving_video_path, capsys):
    from media import sound_of, video_with_sound

    talking = tmp_path / "talking.mp4"
    video_with_sound(driving_video_path, talking, frames=12)  # 1 s at the sample's 12 fps, a 440 Hz tone
    common = ["--weights", str(golden_state_dict_path), "--reference", str(source_image_path), "--driving",
              str(talking), "--frames", "6", "--steps", "1"]
    assert cli.main(["demo", "-o", str(tmp_path / "same.mp4"), "--quiet", *common]) == 0
    samples, rate = sound_of(tmp_path / "same.mp4")
    assert abs(len(samples) / rate - 0.5) < 0.03  # 6 of the 12 frames: half a second of the voice
    assert cli.main(["demo", "-o", str(tmp_path / "faster.mp4"), "--fps", "24", *common]) == 0
    assert sound_of(tmp_path / "faster.mp4") is None
    err = capsys.readouterr().err
    assert "--fps 24 differs from the driving video's" in err and "the output has no sound" in err


def test_animate_with_weights_lacking_clip_explains(tmp_path, golden_state_dict_path, source_image_path,
                                                   driving_video_path, capsys):
    # The tiny weights carry no CLIP text encoder: animate (which uses the empty prompt) must say so, not crash.
    out = tmp_path / "o.mp4"
    code = cli.main(["animate", "--checkpoint", str(golden_state_dict_path), "--reference", str(source_image_path),
                     "--driving", str(driving_video_path), "-o", str(out), "--resolution", "64", "--frames", "2",
                     "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "CLIP" in err and "Traceback" not in err
    assert not out.exists()


def test_animate_reports_a_missing_reference(tmp_path, golden_state_dict_path, capsys):
    code = cli.main(["animate", "--checkpoint", str(golden_state_dict_path), "--reference",
                     str(tmp_path / "nope.png"), "--driving", str(tmp_path / "nope.mp4"), "-o", str(tmp_path / "o.mp4")])
    assert code == 2
    assert "nope.png" in capsys.readouterr().err


def test_convert_writes_a_loadable_safetensors(tmp_path, golden_state_dict_path, capsys):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from xportrait_core.model.checkpoint import load_xportrait

    source = tmp_path / "model_state-415001.th"
    torch.save({"state_dict": load_file(str(golden_state_dict_path))}, source)
    out = tmp_path / "xportrait-fp16.safetensors"
    assert cli.main(["convert", str(source), str(out)]) == 0
    assert "wrote" in capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["format"] == "xportrait-core"
        assert f.get_tensor("unet.out.2.weight").dtype == torch.float16
    model = load_xportrait(out)
    assert model.config.unet.model_channels == 32


def test_convert_refuses_a_file_that_is_not_xportrait(tmp_path, capsys):
    import torch

    source = tmp_path / "other.ckpt"
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, source)
    code = cli.main(["convert", str(source), str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err
    assert code != 0 and "not an X-Portrait checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_compile_is_ignored_with_a_note_off_cuda(tmp_path, golden_state_dict_path, source_image_path,
                                                 driving_video_path, capsys, monkeypatch):
    from xportrait_core.fast import compilation as acceleration

    if cli_device_is_cuda():
        pytest.skip("checks the CPU path")
    compiled = []
    monkeypatch.setattr(acceleration, "compile_networks", lambda model, **kw: compiled.append(model))
    out = tmp_path / "demo.mp4"
    code = cli.main(["demo", "-o", str(out), "--weights", str(golden_state_dict_path), "--compile",
                     "--reference", str(source_image_path), "--driving", str(driving_video_path),
                     "--frames", "2", "--steps", "1", "--decode-chunk", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "--compile applies on CUDA GPUs only" in err
    assert compiled == []


def cli_device_is_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
