#!/usr/bin/env python3
"""Peak host memory (RSS) of the command line against video length: N frames and 10N frames of a 1080p clip.

The command line streams a video end to end (frames decoded as they are read, hints kept at the working
resolution in float16, frames decoded and encoded a chunk at a time), so the longer run should peak within 1.5x
of the shorter one. Each run is a fresh `python -m xportrait_core animate` process; its peak RSS is read with
`resource.getrusage(RUSAGE_CHILDREN)` by a wrapper process of its own.

    # full size on a GPU: the official weights, or random full-size ones (speed and memory do not depend on them)
    python benchmarks/rss_long_video.py --checkpoint model_state-415001.th --frames 24 240
    python benchmarks/rss_long_video.py --random-weights /tmp/xportrait_random.safetensors --frames 24 240

The driving clip is the sample driving video stretched to 1920x1080 and looped to the longest length asked for
(sample assets: $XPORTRAIT_ASSETS, default ../shared/assets). Prints one JSON line per run and the ratio. The
tiny-model CPU version of this measurement is tests/integration/test_cli_files.py
(test_peak_memory_stays_flat_with_ten_times_the_frames).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("XPORTRAIT_ASSETS", ROOT.parent / "shared" / "assets"))

_PEAK_RSS = textwrap.dedent("""
    import resource, subprocess, sys
    result = subprocess.run(sys.argv[1:])
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)
    sys.exit(result.returncode)
""")


def full_hd_clip(source: Path, target: Path, frames: int) -> None:
    import av
    import cv2

    with av.open(str(source)) as src:
        stream = src.streams.video[0]
        rate = stream.average_rate
        images = [f.to_ndarray(format="rgb24") for f in src.decode(stream)]
    with av.open(str(target), "w") as out:
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = 1920, 1080, "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "30"}
        for index in range(frames):
            # Back and forth through the sample, so the motion stays continuous however long the clip.
            turn = index % (2 * len(images) - 2)
            image = images[turn if turn < len(images) else 2 * len(images) - 2 - turn]
            big = cv2.resize(image, (1920, 1080), interpolation=cv2.INTER_LINEAR)
            out.mux(video.encode(av.VideoFrame.from_ndarray(big, format="rgb24")))
        out.mux(video.encode())


def random_full_size_checkpoint(path: Path) -> None:
    """The official architecture with PyTorch's default initialisation and a CLIP text encoder, in bf16."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from xportrait_core.model.config import XPortraitConfig
    from xportrait_core.model.xportrait import XPortrait

    torch.manual_seed(0)
    model = XPortrait(XPortraitConfig.official(), with_text_encoder=True)
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() and not k.endswith("pos_encoder.pe") else v)
             .contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="X-Portrait weights (with CLIP)")
    weights.add_argument("--random-weights", metavar="PATH",
                         help="write random full-size weights here (once) and use them")
    parser.add_argument("--frames", type=int, nargs="+", default=[24, 240])
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps (memory does not depend on them)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more `animate` arguments, e.g. --extra --dtype bf16 --compile")
    args = parser.parse_args()

    checkpoint = Path(args.checkpoint) if args.checkpoint else Path(args.random_weights)
    if args.random_weights and not checkpoint.is_file():
        random_full_size_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        driving = scratch / "driving_1080p.mp4"
        full_hd_clip(ASSETS / "driving_video.mp4", driving, max(args.frames))
        peaks = {}
        for frames in args.frames:
            command = [sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "xportrait_core", "animate",
                       "--checkpoint", str(checkpoint), "--reference", str(ASSETS / "source_image.png"),
                       "--driving", str(driving), "--frames", str(frames), "--steps", str(args.steps),
                       "--resolution", str(args.resolution), "--quiet", "-o", str(scratch / f"out_{frames}.mp4"),
                       *args.extra]
            start = time.monotonic()
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            if result.returncode != 0:
                print(result.stderr[-3000:], file=sys.stderr)
                return result.returncode
            peaks[frames] = int(result.stdout.split()[-1]) / 1024
            print(json.dumps({"frames": frames, "peak_rss_mib": round(peaks[frames]),
                              "seconds": round(time.monotonic() - start, 1)}), flush=True)
    shortest, longest = min(peaks), max(peaks)
    print(f"peak RSS {peaks[longest]:.0f} MiB at {longest} frames vs {peaks[shortest]:.0f} MiB at {shortest}: "
          f"x{peaks[longest] / peaks[shortest]:.2f} for x{longest / shortest:g} the frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
