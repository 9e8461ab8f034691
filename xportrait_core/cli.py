"""Command line: X-Portrait without ComfyUI.

    python -m xportrait_core animate --reference IMG --driving VIDEO [--checkpoint PATH] -o OUT.mp4
    python -m xportrait_core demo -o demo.mp4          # tiny golden weights + sample assets, 64x64 (developers)
    python -m xportrait_core convert IN.th OUT.safetensors
    torchrun --nproc-per-node N -m xportrait_core animate ...   # each step's windows spread over N processes/GPUs

`animate` uses the official demo's defaults (30 DDIM steps, guidance 5, windows of 16 frames overlapping by 4,
seed 999, best frame searched automatically, 512x512). The few-step path: `--lora lcm-lora-sdv1-5.safetensors
--sampler lcm` (6 steps, guidance 1.5 unless given).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .model.dtypes import PRECISIONS


CHECKPOINT_ENV = "XPORTRAIT_CHECKPOINT"
MODELS_DIR_ENV = "XPORTRAIT_MODELS_DIR"  # the node pack's fallback folder variable, honoured here too
OFFICIAL_CHECKPOINT_NAME = "model_state-415001.th"
OFFICIAL_WEIGHTS_URL = "https://drive.google.com/drive/folders/1Bq0n-w1VT5l99CoaVg02hFpqE5eGLo9O"

PACK_ROOT = Path(__file__).resolve().parents[1]


class CheckpointNotFound(FileNotFoundError):
    pass


# ---- checkpoint search ----------------------------------------------------------------------------------------


def model_folders(cwd: Optional[Path] = None) -> list[Path]:
    """Folders searched for a checkpoint, in order: $XPORTRAIT_MODELS_DIR entries, ComfyUI's models/xportrait when
    this pack sits in ComfyUI/custom_nodes, then ./models/xportrait."""
    folders = [Path(p) for p in os.environ.get(MODELS_DIR_ENV, "").split(os.pathsep) if p]
    if PACK_ROOT.parent.name == "custom_nodes":
        folders.append(PACK_ROOT.parent.parent / "models" / "xportrait")
    folders.append((cwd or Path.cwd()) / "models" / "xportrait")
    return folders


def find_checkpoint(explicit: Optional[str] = None, cwd: Optional[Path] = None) -> Path:
    """--checkpoint, else $XPORTRAIT_CHECKPOINT, else the one checkpoint file in the first model folder holding any."""
    from .model.checkpoint import CHECKPOINT_SUFFIXES

    for source, value in (("--checkpoint", explicit), (f"${CHECKPOINT_ENV}", os.environ.get(CHECKPOINT_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise CheckpointNotFound(f"{source} points at {path}, which is not a file")
            return path

    folders = model_folders(cwd)
    for folder in folders:
        if not folder.is_dir():
            continue
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(CHECKPOINT_SUFFIXES))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise CheckpointNotFound(f"several checkpoints in {folder} ({names}): choose one with --checkpoint")
    searched = "\n".join(f"  - {f}" for f in folders)
    raise CheckpointNotFound(
        "no X-Portrait checkpoint found.\n"
        f"Download {OFFICIAL_CHECKPOINT_NAME} from the official X-Portrait release ({OFFICIAL_WEIGHTS_URL}) and\n"
        f"either pass --checkpoint PATH, set ${CHECKPOINT_ENV}=PATH, or put the file in one of:\n{searched}\n"
        "(`python -m xportrait_core convert` turns it into a smaller, safer .safetensors file.)"
    )


# ---- progress -------------------------------------------------------------------------------------------------


class ProgressBar:
    """A one-line text bar on stderr, `bar(done, total)`; redrawn at most ten times a second."""

    def __init__(self, label: str, stream=None, width: int = 30, enabled: bool = True):
        self.label, self.stream, self.width, self.enabled = label, stream or sys.stderr, width, enabled
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._last_done = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        interactive = getattr(self.stream, "isatty", lambda: False)()
        if done < total:
            # A terminal redraws in place; a log gets a line per tenth of the work.
            if interactive and now - self._last_draw < 0.1:
                return
            if not interactive and (10 * done) // max(total, 1) == (10 * self._last_done) // max(total, 1):
                return
        self._last_draw, self._last_done = now, done
        filled = int(self.width * done / max(total, 1))
        elapsed = now - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        line = f"{self.label:<10} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} " \
               f"{elapsed:5.1f}s elapsed, {eta:5.1f}s left"
        if interactive:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ---- arguments ------------------------------------------------------------------------------------------------


def _add_sampling_args(p: argparse.ArgumentParser, steps: int, frames: Optional[int]) -> None:
    from .sampling.lcm import DEFAULT_LCM_GUIDANCE, DEFAULT_LCM_STEPS
    from .sampling.pipeline import DEFAULT_GUIDANCE, DEFAULT_OVERLAP, DEFAULT_SEED, DEFAULT_WINDOW

    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", choices=("ddim", "lcm"), default="ddim",
                   help="'ddim' (official) or 'lcm': few-step LCM sampling, for a UNet with the SD1.5 LCM-LoRA "
                        "merged (--lora)")
    # Their defaults depend on --sampler: filled in after parsing (see _Parser).
    g.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default {steps} for ddim, {DEFAULT_LCM_STEPS} for lcm)")
    g.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE:g} for ddim, "
                        f"{DEFAULT_LCM_GUIDANCE:g} for lcm; 1 skips the unconditional branch)")
    p.set_defaults(ddim_steps=steps)
    g.add_argument("--lora", action="append", default=[], type=_lora_argument, metavar="FILE[:STRENGTH]",
                   help="merge an SD1.5 UNet LoRA (kohya or diffusers format) into the UNet at STRENGTH "
                        "(default 1); repeatable")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    g.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP,
                   help=f"frames shared by neighbouring windows (default {DEFAULT_OVERLAP})")
    g.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help=f"frames denoised together (default {DEFAULT_WINDOW}; the model was trained on 16)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic updates)")
    g.add_argument("--spacing", choices=("uniform", "evenly"), default="uniform",
                   help="DDIM timesteps: 'uniform' is the official schedule (30 steps -> 31 timesteps), "
                        "'evenly' exactly --steps timesteps from 999 down")
    g.add_argument("--init", choices=("reference", "noise"), default="reference",
                   help="initial latents: the reference noised to t=999 (official) or pure noise")
    g.add_argument("--global-strength", type=float, default=1.0,
                   help="global motion ControlNet strength, 0..2 (default 1; 0 turns it off)")
    g.add_argument("--local-strength", type=float, default=1.0,
                   help="local (eyes/mouth) ControlNet strength, 0..2 (default 1; 0 turns it off)")
    g.add_argument("--frames", type=int, default=frames,
                   help="use at most this many driving frames" + (f" (default {frames})" if frames else ""))
    g.add_argument("--best-frame", type=int, default=-1,
                   help="driving frame aligned onto the reference: -1 search (default), -2 no alignment")
    g.add_argument("--fps", type=float, default=None, help="output frame rate (default: the driving video's)")
    g.add_argument("--crf", type=_crf_argument, default=18,
                   help="H.264 quality of the output mp4: 0 lossless .. 51 smallest (default 18)")
    g.add_argument("--quiet", action="store_true", help="no progress bars, notes or warnings (errors still show)")


def _crf_argument(value: str) -> int:
    try:
        crf = int(value)
    except ValueError:
        crf = -1
    if not 0 <= crf <= 51:
        raise argparse.ArgumentTypeError(f"--crf takes a whole number from 0 (lossless) to 51, got {value!r}")
    return crf


def _lora_argument(value: str) -> tuple[str, float]:
    """FILE or FILE:STRENGTH -> (file, strength); a colon inside a path (C:\\...) stays part of it."""
    path, strength = value, 1.0
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            path, strength = head, float(tail)
        except ValueError:
            pass
    if not Path(path).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"LoRA file not found: {path}")
    return str(Path(path).expanduser()), strength


def _fill_sampler_defaults(args: argparse.Namespace) -> None:
    """--steps and --guidance default by --sampler: the official DDIM settings, or LCM's few steps."""
    if getattr(args, "sampler", None) is None:
        return
    from .sampling.lcm import DEFAULT_LCM_GUIDANCE, DEFAULT_LCM_STEPS
    from .sampling.pipeline import DEFAULT_GUIDANCE

    lcm = args.sampler == "lcm"
    if args.steps is None:
        args.steps = DEFAULT_LCM_STEPS if lcm else args.ddim_steps
    if args.guidance is None:
        args.guidance = DEFAULT_LCM_GUIDANCE if lcm else DEFAULT_GUIDANCE


class _Parser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        _fill_sampler_defaults(namespace)
        return namespace, extras


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    from .sampling.pipeline import DECODE_CHUNK

    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cuda, cuda:1, cpu")
    g.add_argument("--dtype", choices=("auto", *PRECISIONS), default="auto",
                   help="weights dtype (auto: fp16 on GPU, fp32 on CPU)")
    g.add_argument("--decode-chunk", type=int, default=DECODE_CHUNK,
                   help=f"frames per VAE decode batch (default {DECODE_CHUNK}; larger batches need more GPU memory, "
                        "as the official 16 does; frames are identical either way)")
    g.add_argument("--low-vram", action="store_true",
                   help="keep the reference net and VAE in system memory except while they work: a lower GPU "
                        "memory peak for a slower run; same frames (README, 'Speed and memory')")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the networks' repeated blocks (CUDA): minutes of compiling on first use "
                        "(less once Inductor's cache has them), then faster steps (README, 'Speed and memory')")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: $OMP_NUM_THREADS, else one per physical core this process "
                        "may use)")
    g.add_argument("--rank-timeout", type=float, default=None,
                   help="under torchrun (several processes): seconds a process waits for the others before the "
                        "job fails (default 1800: rank 0 reads the video and finds the faces while the others wait)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="python -m xportrait_core",
                     description="X-Portrait: animate a portrait with the motion of a driving video.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=argparse.ArgumentParser)

    a = commands.add_parser("animate", help="animate a reference portrait with a driving video",
                            description="Animate --reference with the motion of --driving; writes an mp4.")
    a.add_argument("--reference", required=True, help="reference portrait image (png, jpg, ...)")
    a.add_argument("--driving", required=True, help="driving video (mp4, mov, ...)")
    a.add_argument("--checkpoint", default=None,
                   help=f"X-Portrait weights ({OFFICIAL_CHECKPOINT_NAME} or its safetensors conversion); default: "
                        f"${CHECKPOINT_ENV}, ${MODELS_DIR_ENV}, ComfyUI's models/xportrait, ./models/xportrait")
    a.add_argument("-o", "--output", required=True,
                   help="output video (.mp4, or .mkv / .mov); written under a temporary name and renamed when "
                        "complete, so an interrupted run leaves an existing file as it was")
    a.add_argument("--resolution", type=int, default=512, help="square working resolution, multiple of 64 (512)")
    a.add_argument("--reference-mode", choices=("resize", "crop"), default="resize",
                   help="'resize' stretches the whole image (official); 'crop' takes a square around the face")
    _add_sampling_args(a, steps=30, frames=None)
    _add_runtime_args(a)

    d = commands.add_parser("demo", help="run the real pipeline with the tiny test weights (for developers)",
                            description="End-to-end run of the pipeline with the tiny golden weights (random, so "
                                        "the video is noise-like), on the sample assets, at 64x64.")
    d.add_argument("-o", "--output", default="xportrait_demo.mp4", help="output mp4 (default xportrait_demo.mp4)")
    d.add_argument("--weights", default=None, help="tiny official-format weights (default: the golden fixture)")
    d.add_argument("--reference", default=None, help="reference image (default: the sample asset)")
    d.add_argument("--driving", default=None, help="driving video (default: the sample asset)")
    _add_sampling_args(d, steps=30, frames=16)
    _add_runtime_args(d)

    c = commands.add_parser("convert", help="convert an official checkpoint to safetensors",
                            description="Validate an official checkpoint and write it as one safetensors file.")
    c.add_argument("input", help="official checkpoint (.th / .ckpt)")
    c.add_argument("output", help="destination .safetensors (not the input; written whole or not at all)")
    c.add_argument("--dtype", choices=tuple(PRECISIONS), default="fp16", help="stored dtype (fp16)")
    return parser


# ---- commands -------------------------------------------------------------------------------------------------

def _dtype_for(device, dtype: str):
    from .model.dtypes import dtype_named

    if dtype == "auto":
        dtype = "fp16" if device.type == "cuda" else "fp32"
    return dtype_named(dtype)


@dataclass(frozen=True)
class CheckedRun:
    """What the checks before any model work found: the inputs opened, the output's path, whether it gets sound."""

    device: object
    dtype: object
    reference_image: object  # uint8 (H, W, 3)
    driving: object  # media.video_io.VideoFrames
    output: Path
    keep_sound: bool


def check_run(args, checkpoint: Path, say) -> CheckedRun:
    """Every argument and path of `animate` / `demo`, checked before the model loads (cli_checks.py)."""
    from . import cli_checks as checks

    checks.check_sampling_numbers(args)
    device = checks.check_device(args.device)
    reference_image = checks.read_image(args.reference)
    output = checks.check_output_path(args.output, [("--driving", args.driving), ("--reference", args.reference),
                                                    ("the checkpoint", str(checkpoint))])
    driving = checks.open_driving_video(args.driving, args.frames)
    if args.best_frame >= len(driving):
        raise checks.UsageError(f"--best-frame {args.best_frame} is out of range: the run animates {len(driving)} "
                                f"driving frames (use 0..{len(driving) - 1}, -1 to search, -2 for none)")
    # The driving video's sound goes under the animation (one frame per driving frame, from its first): unless the
    # frame rate is changed, when it would no longer be in sync.
    keep_sound = driving.info.has_audio and (args.fps is None or abs(args.fps - driving.fps) < 1e-3)
    if driving.info.has_audio and not keep_sound:
        say(f"--fps {args.fps:g} differs from the driving video's {driving.fps:g}: the output has no sound")
    checks.check_video_format(output, with_sound=keep_sound)
    return CheckedRun(device, _dtype_for(device, args.dtype), reference_image, driving, output, keep_sound)


def _run_pipeline(args, checkpoint: Path, resolution: int, reference_mode: str, config=None, context_fn=None) -> int:
    from .sampling import distributed

    # Under torchrun every process runs this; rank 0 alone reads the inputs, shows progress and writes the output.
    ranks = distributed.Ranks.from_environment()
    first = ranks is None or ranks.is_first
    show = not args.quiet and first
    say = (lambda msg: print(msg, file=sys.stderr)) if show else (lambda msg: None)
    from . import cli_checks as checks

    if first:
        run = check_run(args, checkpoint, say)
        device, dtype = run.device, run.dtype
    else:
        checks.check_sampling_numbers(args)
        device = checks.check_device(args.device)
        dtype = _dtype_for(device, args.dtype)

    import numpy as np
    import torch

    from .fast.operations import fast_operations
    from .fast.prepare import prepare_model
    from .model.checkpoint import load_xportrait
    from .faces.motion_hints import extract_motion
    from .media.image_formats import to_uint8
    from .sampling.pipeline import animate_latents, iter_frames
    from .sampling.windows import spreading_windows, windows_per_step
    from .faces.reference_crop import prepare_reference
    from .media.video_io import write_video

    torch.set_num_threads(checks.torch_threads(getattr(args, "threads", None)))
    if ranks is not None:
        timeout = getattr(args, "rank_timeout", None) or distributed.DEFAULT_TIMEOUT_S
        device = distributed.start(ranks, device, timeout)
        say(f"{ranks.world_size} processes ({distributed.backend_for(device)}): each step's windows are shared "
            "among them")
    if first:
        reference = prepare_reference(run.reference_image, resolution, mode=reference_mode,
                                      where=f"the reference image {args.reference}")

    say(f"loading {checkpoint} on {device} as {str(dtype).replace('torch.', '')}")
    model = load_xportrait(checkpoint, config, dtype=dtype, device=device, operations=fast_operations())
    apply_loras(model, args.lora, say)
    on_cuda = device.type == "cuda"
    if getattr(args, "compile", False) and not on_cuda:
        say(f"--compile applies on CUDA GPUs only: running uncompiled on {device}")
    # Channels-last on a GPU: cuDNN's convolutions run it without layout conversions (the README's rows all do).
    prepare_model(model, channels_last=on_cuda, compile=on_cuda and getattr(args, "compile", False),
                  low_vram=getattr(args, "low_vram", False))
    # Text conditioning before the long steps, so a checkpoint without CLIP weights fails at once.
    context = context_fn(model) if context_fn else model.empty_prompt_context()

    if first:
        # The driving video is decoded frame by frame (twice when the best frame is searched), never held whole;
        # the hints are kept at the working resolution in float16, half the memory of float32 (windows are cast to
        # the model's dtype as they are denoised).
        motion = extract_motion(run.driving, reference.image, resolution, best_frame=args.best_frame,
                                progress=ProgressBar("faces", enabled=show), hint_dtype=np.float16)
        say(f"driving video: {motion.num_frames} frames at {run.driving.fps:g} fps")
        hints = [torch.from_numpy(hint) for hint in (motion.global_hint, motion.local_hint)]
        reference_image = reference.image
        del motion
    else:
        hints, reference_image = [None, None], None
    if ranks is not None:
        # The other ranks get rank 0's prepared reference and hints: they never open the inputs.
        hints = [distributed.broadcast_tensor(hint, device) for hint in hints]
        reference_image = distributed.broadcast_tensor(
            None if reference_image is None else torch.from_numpy(np.ascontiguousarray(reference_image)),
            device).numpy()
        note = distributed.idle_ranks_note(windows_per_step(hints[0].shape[0], args.window, args.overlap),
                                           ranks.world_size)
        if note:
            say(f"note: {note}")

    if device.type == "cuda":
        # Pinned here, once: the denoiser would otherwise pin a second copy while these are still held.
        hints = [hint.pin_memory() for hint in hints]
    with spreading_windows(distributed.SpreadWindows(ranks) if ranks is not None else None):
        latents = animate_latents(
            model, reference_image, global_hint=hints[0], local_hint=hints[1], steps=args.steps,
            guidance_scale=args.guidance, eta=args.eta, window=args.window, overlap=args.overlap, seed=args.seed,
            timestep_spacing=args.spacing, init=args.init, context=context, uncond_context=context,
            global_strength=args.global_strength, local_strength=args.local_strength,
            callback=ProgressBar("sampling", enabled=show), sampler=args.sampler,
        )
    del hints
    if not bool(torch.isfinite(latents).all()):
        raise ValueError(checks.explain_non_finite(checkpoint, dtype, "sampling"))
    num_frames = latents.shape[0]
    decode_bar = ProgressBar("decoding", enabled=show)

    def decoded(frames_latents):
        for chunk in iter_frames(model, frames_latents, chunk=args.decode_chunk):
            if not np.isfinite(chunk).all():
                raise ValueError(checks.explain_non_finite(checkpoint, dtype, "the VAE's decoding"))
            yield to_uint8(chunk)

    if ranks is not None and not first:
        # Each rank decodes its share of the frames and hands them to rank 0, which writes the file.
        mine = distributed.window_share(num_frames, ranks.world_size, ranks.rank)
        if len(mine):
            frames = np.concatenate(list(decoded(latents[mine.start:mine.stop])))
            distributed.send_to_first(torch.from_numpy(frames), device)
        distributed.stop()
        return 0
    shares = [range(num_frames)] if ranks is None else \
        [distributed.window_share(num_frames, ranks.world_size, rank) for rank in range(ranks.world_size)]

    def decoded_frames():
        # Decoded a chunk at a time and encoded as they come: no video-length buffer of frames (the other ranks'
        # shares arrive whole, in frame order, once this rank's own frames are written).
        done = 0
        for chunk in decoded(latents[shares[0].start:shares[0].stop]):
            yield from chunk
            done += len(chunk)
            decode_bar(done, num_frames)
        for rank, share in enumerate(shares[1:], start=1):
            if len(share):
                yield from distributed.receive_from(rank, (len(share), resolution, resolution, 3), device).numpy()
                done += len(share)
                decode_bar(done, num_frames)

    path = write_video(run.output, decoded_frames(), args.fps or run.driving.fps, crf=args.crf,
                       audio_from=args.driving if run.keep_sound else None)
    if ranks is not None:
        distributed.stop()
    say(f"wrote {path} ({num_frames} frames, {resolution}x{resolution})")
    return 0


def apply_loras(model, loras, say=lambda message: None) -> None:
    """Merge each --lora (file, strength) into the model's UNet, in order."""
    from .model.lora import merge_lora_file

    for path, strength in loras or ():
        lora = merge_lora_file(model.unet, path, strength)
        say(f"merged LoRA {Path(path).name} at strength {strength:g} ({len(lora.factors)} UNet weights)")


def _cmd_animate(args) -> int:
    checkpoint = find_checkpoint(args.checkpoint)
    return _run_pipeline(args, checkpoint, args.resolution, args.reference_mode)


def _shared_dir(env: str, name: str) -> Path:
    return Path(os.environ.get(env, PACK_ROOT.parent / "shared" / name))


def _cmd_demo(args) -> int:
    import torch

    from .model.config import XPortraitConfig

    golden, assets = _shared_dir("XPORTRAIT_GOLDEN", "golden"), _shared_dir("XPORTRAIT_ASSETS", "assets")
    args.weights = args.weights or str(golden / "tiny_official_state_dict.safetensors")
    args.reference = args.reference or str(assets / "source_image.png")
    args.driving = args.driving or str(assets / "driving_video.mp4")
    for what, value in (("tiny weights", args.weights), ("reference", args.reference), ("driving video", args.driving)):
        if not Path(value).is_file():
            raise FileNotFoundError(f"demo {what} not found at {value} (set XPORTRAIT_GOLDEN / XPORTRAIT_ASSETS "
                                    "or pass --weights / --reference / --driving)")
    config = XPortraitConfig.tiny()
    # The tiny weights carry no CLIP: both branches get an all-zero context of the tiny UNet's width as the
    # stand-in for CLIP("").
    zeros = lambda model: torch.zeros(1, config.text_encoder.max_length, config.unet.context_dim)  # noqa: E731
    status = _run_pipeline(args, Path(args.weights), config.image_size, "resize", config=config, context_fn=zeros)
    if status == 0 and _is_first_rank():
        # The video of random tiny weights is noise: the strip shows what the run did compute from the inputs.
        from .demo_strip import demo_strip, strip_path, write_png

        strip = write_png(strip_path(args.output), demo_strip(args.reference, args.driving, args.output,
                                                              config.image_size, args.frames, args.best_frame))
        if not args.quiet:
            print(f"wrote {strip} (reference, driving frames, motion hints, output frames, identity plot)",
                  file=sys.stderr)
    return status


def _is_first_rank() -> bool:
    from .sampling.distributed import Ranks

    ranks = Ranks.from_environment()
    return ranks is None or ranks.is_first


def _cmd_convert(args) -> int:
    from .cli_checks import check_output_path
    from .model.checkpoint import convert_checkpoint
    from .model.dtypes import dtype_named

    check_output_path(args.output, [("the input", args.input)], flag="the output")
    report = convert_checkpoint(args.input, args.output, dtype=dtype_named(args.dtype))
    print(f"wrote {args.output}", file=sys.stderr)
    if report is not None and hasattr(report, "describe"):
        print(report.describe(), file=sys.stderr)
    return 0


COMMANDS = {"animate": _cmd_animate, "demo": _cmd_demo, "convert": _cmd_convert}


# The command line's CUDA allocator setting where the user set none (see default_cuda_allocator).
DEFAULT_CUDA_ALLOC_CONF = "expandable_segments:True"


def default_cuda_allocator() -> None:
    """Expandable segments for PyTorch's CUDA allocator, unless PYTORCH_CUDA_ALLOC_CONF says otherwise.

    They let the caching allocator grow a segment in place instead of keeping freed blocks of every activation
    size, so a job reserves less memory beyond what it allocates (figures: benchmarks/NOTES.md). The setting is
    read when CUDA first
    allocates, so this runs before any work; both entry points (`python -m xportrait_core` and the `xportrait`
    script) come through main()."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", DEFAULT_CUDA_ALLOC_CONF)


class _WarningLines(logging.Handler):
    """The pack's log warnings as `warning: ...` lines on stderr, once each (the core logs every warning it
    keeps, e.g. a face missed on a driving frame)."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for prefix in ("X-Portrait: ", "X-Portrait "):
            message = message[len(prefix):] if message.startswith(prefix) else message
        label = "warning" if record.levelno < logging.ERROR else "error"
        sys.stderr.write(f"{label}: {message}\n")


# The pack's loggers: the core's modules log under their module names, the model and sampling code as "xportrait".
PACK_LOGGERS = ("xportrait_core", "xportrait")


def _route_warnings(quiet: bool) -> logging.Handler:
    handler = _WarningLines(level=logging.ERROR if quiet else logging.WARNING)
    for name in PACK_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    return handler


def main(argv: Optional[Sequence[str]] = None) -> int:
    default_cuda_allocator()
    args = build_parser().parse_args(argv)
    from .cli_checks import UsageError
    from .media.atomic import Terminated, terminate_on_sigterm
    from .sampling.sampler import SamplingCancelled

    from .sampling.distributed import Ranks, RankLost

    # Under torchrun each process prints its own errors, named by rank; warnings and progress come from rank 0.
    ranks = Ranks.from_environment() if args.command in ("animate", "demo") else None
    who = f"{ranks.label}: " if ranks is not None else ""
    handler = _route_warnings(getattr(args, "quiet", False) or (ranks is not None and not ranks.is_first))
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so outputs being written are removed and existing ones kept (media/atomic.py).
        previous_sigterm = signal.getsignal(signal.SIGTERM)
        terminate_on_sigterm()
    try:
        return COMMANDS[args.command](args)
    except (UsageError, FileNotFoundError, ValueError, ImportError) as error:
        # User-facing problems (missing files or weights, bad arguments, checkpoints that do not fit, no face,
        # no CLIP weights): the message, not a traceback.
        print(f"error: {who}{error}", file=sys.stderr)
        return 2
    except RankLost as error:
        # Another process of the job failed: its own error (above, or in torchrun's summary) is the cause.
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SamplingCancelled):
        print("\ncancelled", file=sys.stderr)
        return 130
    except Terminated:
        print("\nterminated", file=sys.stderr)
        return 143
    except Exception as error:
        if ranks is not None:
            # The traceback follows; this line says which process of the job it is.
            print(f"error: {who}failed: {type(error).__name__}: {error}", file=sys.stderr)
        raise
    finally:
        for name in PACK_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
