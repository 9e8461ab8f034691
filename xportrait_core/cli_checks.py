"""The command line's checks of arguments and paths, all made before any model work.

A mistake in an argument or a path is found in a fraction of a second, with a message in the user's words, instead
of after minutes of sampling (an output format FFmpeg cannot write) or never (a NaN guidance scale gives a black
video). Every check raises `UsageError`, which the command line prints as an `error:` line with exit status 2.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

# The ranges the ComfyUI nodes accept (nodes/sampling.py, nodes/motion.py): one model, one set of limits.
STEPS_RANGE = (1, 1000)
GUIDANCE_RANGE = (0.0, 30.0)
ETA_RANGE = (0.0, 1.0)
STRENGTH_RANGE = (0.0, 2.0)
MAX_SEED = 0xFFFFFFFFFFFFFFFF
VIDEO_CODEC = "libx264"
AUDIO_CODEC = "aac"


class UsageError(ValueError):
    """A user's mistake in an argument, a path or an input file: printed as `error: ...`, exit status 2."""


# ---- numbers ----------------------------------------------------------------------------------------------------


def check_number(flag: str, value, low=None, high=None, *, above: Optional[float] = None) -> None:
    """A finite number within [low, high] (either end optional), or strictly above `above`."""
    if value is None:
        return
    if not math.isfinite(float(value)):
        raise UsageError(f"{flag} must be a finite number, got {value}")
    if above is not None and not value > above:
        raise UsageError(f"{flag} must be greater than {above:g}, got {value:g}")
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            span = f"between {low:g} and {high:g}"
        else:
            span = f"at least {low:g}" if low is not None else f"at most {high:g}"
        raise UsageError(f"{flag} must be {span}, got {value:g}")


def check_sampling_numbers(args) -> None:
    """The sampling and runtime numbers of `animate` / `demo`, as the nodes would accept them."""
    check_number("--steps", args.steps, *STEPS_RANGE)
    check_number("--guidance", args.guidance, *GUIDANCE_RANGE)
    check_number("--eta", args.eta, *ETA_RANGE)
    check_number("--global-strength", args.global_strength, *STRENGTH_RANGE)
    check_number("--local-strength", args.local_strength, *STRENGTH_RANGE)
    check_number("--seed", args.seed, 0, MAX_SEED)
    check_number("--window", args.window, 1)
    check_number("--overlap", args.overlap, 0)
    if args.overlap >= args.window:
        raise UsageError(f"--overlap ({args.overlap}) must be smaller than --window ({args.window})")
    check_number("--frames", args.frames, 1)
    check_number("--best-frame", args.best_frame, -2)
    check_number("--fps", args.fps, above=0.0)
    check_number("--decode-chunk", args.decode_chunk, 1)
    check_number("--threads", getattr(args, "threads", None), 1)
    resolution = getattr(args, "resolution", None)
    if resolution is not None and (resolution < 64 or resolution % 64):
        raise UsageError(f"--resolution must be a multiple of 64 (64, 128, ..., 512), got {resolution}")


# ---- devices ----------------------------------------------------------------------------------------------------


def check_device(name: str):
    """--device as a torch.device: `auto` picks cuda when PyTorch sees a GPU. A device this PyTorch cannot use is a
    UsageError (no traceback)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: PyTorch sees no CUDA GPU here (a CPU-only PyTorch, no driver, or "
                             "CUDA_VISIBLE_DEVICES hides it); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"--device {name}: Apple's MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: the pack runs on cpu, cuda or mps")
    return device


def physical_cores() -> int:
    """CPU cores this process may use, one per physical core (hyper-threads share a core's arithmetic units, and
    torch's CPU kernels gain nothing from a second thread on one)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def torch_threads(requested: Optional[int]) -> int:
    """--threads, else $OMP_NUM_THREADS when set, else the physical cores this process may use."""
    if requested:
        return int(requested)
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return physical_cores()


# ---- paths ------------------------------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(output: str, inputs: Sequence[tuple[str, Optional[str]]], flag: str = "-o/--output") -> Path:
    """The output's folder exists and is writable, the output is no directory and is none of the inputs
    ((flag, path) pairs): an animation or a conversion written over its own input would destroy it."""
    path = Path(output).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {output} is a folder; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{flag} {output}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {output}: the folder {folder} is not writable")
    for input_flag, value in inputs:
        if value and (_same_file(path, Path(value).expanduser())
                      or path.resolve() == Path(value).expanduser().resolve()):
            raise UsageError(f"{flag} {output} is the same file as {input_flag}: writing it would destroy the "
                             "input; choose another output name")
    return path


def check_video_format(output: Path, with_sound: bool) -> str:
    """FFmpeg can write an H.264 video (and AAC sound, when the driving video has some) into the container the
    output's suffix names. Returns the container's name. Nothing is written: the container is opened in memory."""
    import av

    suffix = output.suffix.lower()
    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / f"probe{suffix}"
        try:
            container = av.open(str(probe), mode="w")
        except (ValueError, av.error.FFmpegError):
            what = f"the suffix {suffix!r}" if suffix else "a name without a suffix"
            raise UsageError(f"-o {output}: {what} names no video format FFmpeg can write; use .mp4 "
                             "(or .mkv, .mov)") from None
        try:
            name = container.format.name
            try:
                container.add_stream(VIDEO_CODEC, rate=25)
            except (ValueError, av.error.FFmpegError):
                raise UsageError(f"-o {output}: the {name} format cannot hold H.264 video; use .mp4 "
                                 "(or .mkv, .mov)") from None
            if with_sound:
                try:
                    container.add_stream(AUDIO_CODEC, rate=44100)
                except (ValueError, av.error.FFmpegError):
                    raise UsageError(f"-o {output}: the {name} format cannot hold the driving video's sound "
                                     "(AAC); use .mp4 (or .mkv, .mov)") from None
        finally:
            container.close()
    return name


# ---- input files ------------------------------------------------------------------------------------------------


def read_image(path: str, flag: str = "--reference"):
    """An image file as uint8 (H, W, 3) RGB; a missing, unreadable, truncated or oversized (decompression bomb)
    file is a UsageError that says which."""
    import numpy as np
    from PIL import Image

    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"{flag} {path}: image file not found")
    try:
        with Image.open(file) as image:
            image.load()
            return np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError as error:
        raise UsageError(f"{flag} {path}: the image is too large to read safely ({error})") from None
    except Image.UnidentifiedImageError:
        raise UsageError(f"{flag} {path}: not an image file PIL can read (png, jpg, webp, ...)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UsageError(f"{flag} {path}: the image could not be read ({error}); the file may be truncated "
                         "or damaged") from None


def open_driving_video(path: str, max_frames: Optional[int]):
    """The driving video as `VideoFrames` (decoded as it is read); a missing or unreadable file is a UsageError."""
    from .media.video_io import VideoFrames

    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"--driving {path}: video file not found")
    try:
        return VideoFrames(file, max_frames=max_frames)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--driving {path}: {error}") from None


# ---- results ----------------------------------------------------------------------------------------------------


def non_finite_tensors(checkpoint: Path, dtype=None) -> list[str]:
    """What is wrong with the checkpoint's tensors, one line per tensor (named as in the file): NaN or infinity,
    or values beyond `dtype`'s range (a float32 weight over 65504 becomes infinite in float16)."""
    import torch

    from .model.checkpoint import read_state_dict

    limit = torch.finfo(dtype).max if dtype is not None and dtype.is_floating_point else None
    bad = []
    for name, tensor in read_state_dict(checkpoint).items():
        if not tensor.is_floating_point():
            continue
        if bool(torch.isnan(tensor).any()):
            bad.append(f"{name} holds NaN")
        elif not bool(torch.isfinite(tensor).all()):
            bad.append(f"{name} holds infinity")
        elif limit is not None and float(tensor.abs().max()) > limit:
            bad.append(f"{name} holds values too large for {str(dtype).replace('torch.', '')}")
    return bad


def explain_non_finite(checkpoint: Path, dtype, stage: str) -> str:
    """The message for a result holding NaN or infinity: the checkpoint's tensors to blame, when it has any, else
    the arithmetic of the chosen dtype. Called only once a result is wrong, so a good run pays nothing for it."""
    try:
        bad = non_finite_tensors(checkpoint, dtype)
    except Exception:  # the message must not fail: a file unreadable now was read to build the model
        bad = []
    dtype_name = str(dtype).replace("torch.", "")
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        return (f"{stage} produced NaN or infinite values: in the checkpoint {checkpoint.name}, tensor {bad[0]}"
                f"{more}; the file is damaged: download or convert it again")
    return (f"{stage} produced NaN or infinite values in {dtype_name} although the checkpoint's weights are "
            "finite; try --dtype bf16 or --dtype fp32")
