#!/usr/bin/env python3
"""Time the job spread over several GPUs (sampling/distributed.py), for the README's scaling table.

Run under torchrun, once per GPU count; one process is the one-GPU baseline:

    torchrun --standalone --nproc-per-node 1 benchmarks/bench_multigpu.py --frames 64 256
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_multigpu.py --frames 64 256
    torchrun --standalone --nproc-per-node 4 benchmarks/bench_multigpu.py --frames 64 256
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_multigpu.py --device cpu --config tiny --dtype fp32 \
        --resolution 64 --frames 20 --steps 2 --runs 1                       # a smoke test on CPUs (gloo)

The job is bench_job.py's (full-size model with random weights, bf16, 30 DDIM steps, guidance 5, windows of 16
overlapping by 4, every frame VAE-decoded), with each step's windows spread over the processes and each process
decoding its share of the frames, as `torchrun ... -m xportrait_core animate` runs it (after the faces; without
sending the frames to rank 0 and writing the file). Rank 0 prints one JSON line per frame count: the median
seconds of --runs timed jobs after a warm-up, from a barrier before to a barrier after.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402
import torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", choices=common.DTYPES, default="bf16")
    parser.add_argument("--config", choices=("official", "tiny"), default="official")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--compile", choices=("off", "regional"), default="off")
    args = parser.parse_args()

    import torch.distributed as dist

    from xportrait_core.sampling import distributed
    from xportrait_core.sampling.pipeline import decode_frames
    from xportrait_core.sampling.windows import spreading_windows, windows_per_step

    common.require_device(args.device, "bench_multigpu.py")
    ranks = distributed.Ranks.from_environment() or distributed.Ranks(0, 1)
    spread = None
    device = torch.device(args.device)
    if ranks.world_size > 1:
        device = distributed.start(ranks, device)
        spread = distributed.SpreadWindows(ranks)
    elif device.type == "cuda":
        torch.cuda.set_device(0)
    common.fast_math()
    model = common.build_random_model(args.config, common.DTYPES[args.dtype], str(device))
    common.speed_up(model, channels_last=device.type == "cuda", compile_mode=args.compile, low_vram=False)

    def barrier() -> None:
        common.sync()
        if ranks.world_size > 1:
            dist.barrier()

    for frames in args.frames:
        job = common.VideoJob(model, frames, args.resolution)

        def run(steps: int) -> None:
            with spreading_windows(spread):
                latents = job.run(steps=steps, guidance=args.guidance, overlap=args.overlap, decode=False)
            mine = distributed.window_share(frames, ranks.world_size, ranks.rank)
            if len(mine):
                decode_frames(model, latents[mine.start:mine.stop], chunk=job.decode_chunk)

        barrier()
        run(2)  # warm-up: kernels, allocator, compiling, CUDA graphs
        seconds = []
        for _ in range(args.runs):
            barrier()
            start = time.perf_counter()
            run(args.steps)
            barrier()
            seconds.append(time.perf_counter() - start)
        if ranks.is_first:
            median = statistics.median(seconds)
            print(json.dumps({"processes": ranks.world_size, "frames": frames, "seconds": round(median, 2),
                              "seconds_per_frame": round(median / frames, 4),
                              "windows_per_step": windows_per_step(frames, 16, args.overlap),
                              "runs": [round(s, 2) for s in seconds], "dtype": args.dtype, "config": args.config,
                              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "compile": args.compile}), flush=True)
    if ranks.world_size > 1:
        distributed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
