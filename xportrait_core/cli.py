"""Command line: X-Portrait without ComfyUI.

    python -m xportrait_core animate --reference IMG --driving VIDEO [--checkpoint PATH] -o OUT.mp4
    python -m xportrait_core demo -o demo.mp4          # tiny golden weights + sample assets, 64x64 (developers)
    python -m xportrait_core convert IN.th OUT.safetensors

`animate` uses the official demo's defaults (30 DDIM steps, guidance 5, windows of 16 frames overlapping by 4,
seed 999, best frame searched automatically, 512x512).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
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
    for source, value in (("--checkpoint", explicit), (f"${CHECKPOINT_ENV}", os.environ.get(CHECKPOINT_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise CheckpointNotFound(f"{source} points at {path}, which is not a file")
            return path
    from .model.checkpoint import CHECKPOINT_SUFFIXES

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
    from .sampling.pipeline import DEFAULT_GUIDANCE, DEFAULT_OVERLAP, DEFAULT_SEED, DEFAULT_WINDOW

    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=steps, help=f"DDIM steps (default {steps})")
    g.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE:g})")
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
    g.add_argument("--global-strength", type=float, default=1.0, help="global motion ControlNet strength")
    g.add_argument("--local-strength", type=float, default=1.0, help="local (eyes/mouth) ControlNet strength")
    g.add_argument("--frames", type=int, default=frames,
                   help="use at most this many driving frames" + (f" (default {frames})" if frames else ""))
    g.add_argument("--best-frame", type=int, default=-1,
                   help="driving frame aligned onto the reference: -1 search (default), -2 no alignment")
    g.add_argument("--fps", type=float, default=None, help="output frame rate (default: the driving video's)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    from .sampling.pipeline import DECODE_CHUNK

    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cuda, cuda:1, cpu")
    g.add_argument("--dtype", choices=("auto", *PRECISIONS), default="auto",
                   help="weights dtype (auto: fp16 on GPU, fp32 on CPU)")
    g.add_argument("--decode-chunk", type=int, default=DECODE_CHUNK,
                   help=f"frames per VAE decode batch (default {DECODE_CHUNK}; the official 16 needs ~7 GB more at 512; "
                        "frames are identical either way)")
    g.add_argument("--low-vram", action="store_true",
                   help="keep the reference net and VAE in system memory except while they work: peak 6.3 GiB "
                        "instead of 8.1 at 512 (bf16, 16 frames, H100), 11.5 s instead of 8.0 s; same frames")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the networks' repeated blocks (CUDA): ~2 min of compiling the first time (~20 s "
                        "once Inductor's cache has them), then 16 frames at 512 took 5.6 s instead of 8.0 s (H100)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xportrait_core",
                                     description="X-Portrait: animate a portrait with the motion of a driving video.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = commands.add_parser("animate", help="animate a reference portrait with a driving video",
                            description="Animate --reference with the motion of --driving; writes an mp4.")
    a.add_argument("--reference", required=True, help="reference portrait image (png, jpg, ...)")
    a.add_argument("--driving", required=True, help="driving video (mp4, mov, ...)")
    a.add_argument("--checkpoint", default=None,
                   help=f"X-Portrait weights ({OFFICIAL_CHECKPOINT_NAME} or its safetensors conversion); default: "
                        f"${CHECKPOINT_ENV}, ${MODELS_DIR_ENV}, ComfyUI's models/xportrait, ./models/xportrait")
    a.add_argument("-o", "--output", required=True, help="output mp4")
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
    c.add_argument("output", help="destination .safetensors")
    c.add_argument("--dtype", choices=tuple(PRECISIONS), default="fp16", help="stored dtype (fp16)")
    return parser


# ---- commands -------------------------------------------------------------------------------------------------

def _device_and_dtype(device: str, dtype: str):
    import torch

    from .model.dtypes import dtype_named

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype == "auto":
        dtype = "fp16" if device.type == "cuda" else "fp32"
    return device, dtype_named(dtype)


def read_image(path: str):
    import numpy as np
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _run_pipeline(args, checkpoint: Path, resolution: int, reference_mode: str, config=None, context_fn=None) -> int:
    import numpy as np

    from .fast.operations import fast_operations
    from .fast.prepare import prepare_model
    from .model.checkpoint import load_xportrait
    from .faces.motion_hints import extract_motion
    from .media.image_formats import to_uint8
    from .sampling.pipeline import animate_latents, iter_frames
    from .faces.reference_crop import prepare_reference
    from .media.video_io import read_video, write_video

    show = not args.quiet
    say = (lambda msg: print(msg, file=sys.stderr)) if show else (lambda msg: None)
    if args.frames is not None and args.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {args.frames}")
    device, dtype = _device_and_dtype(args.device, args.dtype)

    reference = prepare_reference(read_image(args.reference), resolution, mode=reference_mode,
                                  where=f"the reference image {args.reference}")
    if not Path(args.driving).is_file():
        raise FileNotFoundError(f"driving video not found: {args.driving}")

    say(f"loading {checkpoint} on {device} as {str(dtype).replace('torch.', '')}")
    model = load_xportrait(checkpoint, config, dtype=dtype, device=device, operations=fast_operations())
    on_cuda = device.type == "cuda"
    if getattr(args, "compile", False) and not on_cuda:
        say(f"--compile applies on CUDA GPUs only: running uncompiled on {device}")
    # Channels-last on a GPU: cuDNN's convolutions run it without layout conversions (the README's rows all do).
    prepare_model(model, channels_last=on_cuda, compile=on_cuda and getattr(args, "compile", False),
                  low_vram=getattr(args, "low_vram", False))
    # Text conditioning before the long steps, so a checkpoint without CLIP weights fails at once.
    context = context_fn(model) if context_fn else model.empty_prompt_context()

    frames, fps = read_video(args.driving, max_frames=args.frames)
    say(f"driving video: {len(frames)} frames at {fps:g} fps")
    motion = extract_motion(frames, reference.image, resolution, best_frame=args.best_frame,
                            progress=ProgressBar("faces", enabled=show))
    del frames
    for warning in motion.warnings:
        say(f"warning: {warning}")

    latents = animate_latents(
        model, reference, motion, steps=args.steps, guidance_scale=args.guidance, eta=args.eta, window=args.window,
        overlap=args.overlap, seed=args.seed, timestep_spacing=args.spacing, init=args.init, context=context,
        uncond_context=context, global_strength=args.global_strength, local_strength=args.local_strength,
        callback=ProgressBar("sampling", enabled=show),
    )
    decode_bar = ProgressBar("decoding", enabled=show)

    def decoded_frames():
        # Decoded a chunk at a time and encoded as they come: no video-length buffer of frames.
        done = 0
        for chunk in iter_frames(model, latents, chunk=args.decode_chunk):
            yield from to_uint8(chunk)
            done += len(chunk)
            decode_bar(done, latents.shape[0])

    # The driving video's sound goes under the animation (one frame per driving frame, from its first): unless the
    # frame rate is changed, when it would no longer be in sync.
    keep_sound = args.fps is None or abs(args.fps - fps) < 1e-3
    if not keep_sound:
        say(f"--fps {args.fps:g} differs from the driving video's {fps:g}: the output has no sound")
    path = write_video(args.output, decoded_frames(), args.fps or fps, audio_from=args.driving if keep_sound else None)
    say(f"wrote {path} ({latents.shape[0]} frames, {resolution}x{resolution})")
    return 0


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
    if status == 0:
        # The video of random tiny weights is noise: the strip shows what the run did compute from the inputs.
        from .demo_strip import demo_strip, strip_path, write_png

        strip = write_png(strip_path(args.output), demo_strip(args.reference, args.driving, args.output,
                                                              config.image_size, args.frames, args.best_frame))
        print(f"wrote {strip} (reference, driving frames, motion hints, output frames, identity plot)",
              file=sys.stderr)
    return status


def _cmd_convert(args) -> int:
    from .model.checkpoint import convert_checkpoint
    from .model.dtypes import dtype_named

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
    size: with them a compiled 16-frame job reserved 8.3 GiB (7.6 GiB allocated, H200), CUDA graphs included;
    without them 10.2 GiB was measured earlier (README, "Speed and memory"). The setting is read when CUDA first
    allocates, so this runs before any work; both entry points (`python -m xportrait_core` and the `xportrait`
    script) come through main()."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", DEFAULT_CUDA_ALLOC_CONF)


def main(argv: Optional[Sequence[str]] = None) -> int:
    default_cuda_allocator()
    args = build_parser().parse_args(argv)
    from .sampling.sampler import SamplingCancelled

    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, ImportError) as error:
        # User-facing problems (missing files or weights, bad arguments, checkpoints that do not fit, no face,
        # no CLIP weights): the message, not a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SamplingCancelled):
        print("\ncancelled", file=sys.stderr)
        return 130
