#!/usr/bin/env python3
"""Time a user's whole job on a CUDA GPU: median seconds and peak memory, optionally A B A B against another tree.

The job is the command line's after face preprocessing, on the full-size model with random weights (speed does
not depend on their values): VAE-encode the reference, noise it to t=999, DDIM over the official 30-step schedule
(31 timesteps) with guidance 5 in 16-frame windows overlapping by 4, VAE-decode every frame to host memory.

Each configuration (compile setting x allocator, one process each: the allocator is fixed when torch loads) runs
in a worker process that builds the model, applies the speed-ups and warms up (compiling, for compiled runs);
then the timed jobs run one after another. With --compare-with DIR (another checkout, e.g. a `git worktree` or a
`git archive` of an older commit), a second worker imports that tree's `xportrait_core`, both warm up side by
side, and the timed jobs alternate A B A B, so that a drift of the machine over the minutes touches both alike.
--compare-env KEY=VALUE gives the B worker an environment of its own instead (or as well): a switch's A/B.

    python benchmarks/bench_job.py                                    # 16 frames, bf16; off+regional x native+async
    python benchmarks/bench_job.py --compile regional --allocator expandable --runs 5 --phases
    python benchmarks/bench_job.py --compare-with /tmp/base --runs 4  # this tree (A) against /tmp/base (B)
    python benchmarks/bench_job.py --compile off --compare-env XPORTRAIT_GEGLU_KERNEL=0

Prints one JSON object per measurement and a table at the end; --json also writes the records to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402

PREFIX = "@@bench "  # a worker's protocol lines on stdout; anything else it prints is passed on to stderr


# ---- the worker: one tree, one configuration ------------------------------------------------------------------


def _say(**record) -> None:
    sys.stdout.write(PREFIX + json.dumps(record) + "\n")
    sys.stdout.flush()


def _peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def _reset_peaks() -> None:
    import torch

    if torch.cuda.is_available():
        # Memory cached by earlier work would stay reserved through the run and count in its peak: hand it back.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _timed_job(job, args) -> dict:
    _reset_peaks()
    calls = []
    common.sync()
    start = time.perf_counter()
    job.run(steps=args.steps, guidance=args.guidance, overlap=args.overlap, callback=lambda d, t: calls.append(t))
    common.sync()
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "window_calls": calls[-1] if calls else 0, **_peaks()}


def _phases(job, args) -> dict:
    """Milliseconds of GPU timeline per phase of one job, from CUDA events at the pipeline's progress callbacks
    (host clock on the CPU). The first window call includes everything before it (VAE encode, x_T, hint features,
    low-VRAM banks) and runs eagerly; the second records the CUDA graphs (the GPU idles while the host records)."""
    import torch

    on_cuda = torch.cuda.is_available() and job.model.device.type == "cuda"
    marks: list[tuple[object, float]] = []

    def mark(*_):
        event = torch.cuda.Event(enable_timing=True) if on_cuda else None
        if event is not None:
            event.record()
        marks.append((event, time.perf_counter()))

    common.sync()
    mark()
    job.run(steps=args.steps, guidance=args.guidance, overlap=args.overlap, callback=mark, after_sampling=mark)
    mark()
    common.sync()
    spans = [(marks[i - 1][0].elapsed_time(marks[i][0]) if on_cuda else (marks[i][1] - marks[i - 1][1]) * 1000)
             for i in range(1, len(marks))]
    calls = spans[:-2]
    later = calls[2:]
    return {"until window call 1 ends (encode, hint features, eager call)": round(calls[0], 1),
            "window call 2 (graph recording)": round(calls[1], 1) if len(calls) > 1 else None,
            "later window calls (sum)": round(sum(later), 1),
            "later window call (median)": round(statistics.median(later), 2) if later else None,
            "after the last call (graph release)": round(spans[-2], 1),
            "vae decode to host": round(spans[-1], 1),
            "total": round(sum(spans), 1),
            "host total": round((marks[-1][1] - marks[0][1]) * 1000, 1)}


def _job_flops(job, args) -> float:
    """FLOPs of a whole job, counted eagerly by torch.utils.flop_counter (graph replays and compiled regions hide
    their ops): a job of k window calls costs a + b k, so two short jobs give a (VAE, hint features) and b."""
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    stance = getattr(torch.compiler, "set_stance", None)
    previous = os.environ.get("XPORTRAIT_CUDA_GRAPHS")
    os.environ["XPORTRAIT_CUDA_GRAPHS"] = "0"
    counts = []
    try:
        for steps in (1, 2):
            calls = []
            with (stance("force_eager") if stance else contextlib.nullcontext()), FlopCounterMode(display=False) as c:
                job.run(steps=steps, guidance=args.guidance, overlap=args.overlap,
                        callback=lambda d, t: calls.append(t))
            counts.append((calls[-1], c.get_total_flops()))
    finally:
        if previous is None:
            os.environ.pop("XPORTRAIT_CUDA_GRAPHS")
        else:
            os.environ["XPORTRAIT_CUDA_GRAPHS"] = previous
    (k1, f1), (k2, f2) = counts
    per_call = (f2 - f1) / (k2 - k1)
    return f1 - per_call * k1, per_call


def _syncs(job, args) -> dict:
    """Host-device synchronisations during a 2-step job without decoding: each one stalls kernel launches. Their
    number and how many happened at each line (a line that syncs at every step shows 2 or more)."""
    import warnings

    import torch

    if not torch.cuda.is_available():
        return {"count": 0, "where": {}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            job.run(steps=2, guidance=args.guidance, overlap=args.overlap, decode=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites: dict[str, int] = {}
    for w in caught:
        if "prototype feature" not in str(w.message):
            site = f"{Path(w.filename).name}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1
    return {"count": sum(sites.values()), "where": dict(sorted(sites.items(), key=lambda kv: -kv[1]))}


def worker(args) -> int:
    tree = common.use_tree(args.tree)
    import torch

    import xportrait_core
    from xportrait_core.model import attention

    if Path(xportrait_core.__file__).resolve().parents[1] != tree:
        raise SystemExit(f"imported xportrait_core from {xportrait_core.__file__}, not from {tree}")
    common.require_device(args.device, "bench_job.py")
    common.fast_math()
    common.set_inductor_options(args.inductor)
    start = time.perf_counter()
    model = common.build_random_model(args.config, common.DTYPES[args.dtype], args.device)
    common.speed_up(model, channels_last=args.device == "cuda", compile_mode=args.compile_mode,
                    low_vram=args.low_vram)
    job = common.VideoJob(model, args.frames, args.resolution, decode_chunk=args.decode_chunk)
    job.run(steps=2, guidance=args.guidance, overlap=args.overlap)  # warm-up: kernels, allocator, compiling
    common.sync()
    on_cuda = args.device == "cuda"
    _say(kind="ready", tree=str(tree), warmup_seconds=round(time.perf_counter() - start, 1),
         attention=attention.resolve_backend(model.device, model.dtype), dtype=str(model.dtype),
         alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
         allocator_backend=torch.cuda.memory.get_allocator_backend() if on_cuda else "cpu",
         gpu=torch.cuda.get_device_name() if on_cuda else "cpu", torch=torch.__version__)
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            _say(kind="run", **_timed_job(job, args))
        elif command == "phases":
            _say(kind="phases", milliseconds=_phases(job, args))
        elif command == "flops":
            fixed, per_call = _job_flops(job, args)
            _say(kind="flops", fixed=fixed, per_window_call=per_call)
        elif command == "syncs":
            _say(kind="syncs", **_syncs(job, args))
        elif command == "quit":
            break
    return 0


# ---- the parent: configurations, workers, alternation ---------------------------------------------------------


class Worker:
    """A worker process and its protocol: start (it warms up), then run / phases / flops, one answer each."""

    def __init__(self, name: str, tree: Path, env: dict, worker_args: list[str]):
        self.name = name
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                         "--tree", str(tree)] + worker_args,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready: dict | None = None

    def answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(PREFIX):
                record = json.loads(line[len(PREFIX):])
                record.pop("kind")
                return record
            sys.stderr.write(f"[{self.name}] {line}")
        raise SystemExit(f"worker {self.name} ended (exit status {self.process.wait()}) without answering")

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.answer()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
            except BrokenPipeError:
                pass
            self.process.wait()


def _parse_env(items: list[str], flag: str) -> dict:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag}: expected KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def _worker_args(args, compile_mode: str) -> list[str]:
    out = ["--compile-mode", compile_mode, "--frames", str(args.frames), "--steps", str(args.steps),
           "--guidance", str(args.guidance), "--overlap", str(args.overlap), "--decode-chunk", str(args.decode_chunk),
           "--dtype", args.dtype, "--resolution", str(args.resolution), "--device", args.device,
           "--config", args.config]
    if args.low_vram:
        out.append("--low-vram")
    if args.inductor:
        out += ["--inductor"] + args.inductor
    return out


def _environment(allocator: str, extra: dict, args) -> dict:
    env = dict(os.environ)
    env["PYTORCH_CUDA_ALLOC_CONF"] = common.ALLOCATORS[allocator]
    env["XPORTRAIT_ATTENTION"] = args.attention
    env["XPORTRAIT_CUDA_GRAPHS"] = str(args.cuda_graphs)
    env.update(extra)
    return env


def measure(args, records: common.Records) -> None:
    here = common.ROOT
    other = Path(args.compare_with).resolve() if args.compare_with else None
    compare_env = _parse_env(args.compare_env, "--compare-env")
    both_env = _parse_env(args.env, "--env")
    for compile_mode in args.compile:
        for allocator in args.allocator:
            config = {"compile": compile_mode, "allocator": allocator, "frames": args.frames,
                      "low_vram": args.low_vram}
            trees = [("A", here, both_env)]
            if other is not None or compare_env:
                trees.append(("B", other or here, {**both_env, **compare_env}))
            workers = [Worker(name, tree, _environment(allocator, env, args), _worker_args(args, compile_mode))
                       for name, tree, env in trees]
            try:
                # Warm-ups (compiles) side by side; the timed jobs below one at a time.
                threads = [threading.Thread(target=lambda w=w: setattr(w, "ready", w.answer())) for w in workers]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                for w, (_, _, env) in zip(workers, trees):
                    if w.ready is None:
                        raise SystemExit(f"worker {w.name} did not warm up")
                    records.emit(kind="worker", name=w.name, env=env, **config, **w.ready)
                runs = {w.name: [] for w in workers}
                for round_index in range(args.runs):
                    for w in workers:  # A B A B ...
                        result = w.ask("run")
                        runs[w.name].append(result)
                        records.emit(kind="run", name=w.name, round=round_index, **config, **result)
                for w in workers:
                    seconds = [r["seconds"] for r in runs[w.name]]
                    peak = [r["peak_allocated_gib"] for r in runs[w.name] if r["peak_allocated_gib"] is not None]
                    reserved = [r["peak_reserved_gib"] for r in runs[w.name] if r["peak_reserved_gib"] is not None]
                    summary = dict(kind="job", name=w.name, tree=w.ready["tree"], **config,
                                   seconds=round(statistics.median(seconds), 3), runs=seconds,
                                   seconds_per_frame=round(statistics.median(seconds) / args.frames, 4),
                                   window_calls=runs[w.name][-1]["window_calls"],
                                   peak_allocated_gib=max(peak) if peak else None,
                                   peak_reserved_gib=max(reserved) if reserved else None,
                                   gpu=w.ready["gpu"], attention=w.ready["attention"])
                    if args.flops:
                        flops = w.ask("flops")
                        total = flops["fixed"] + flops["per_window_call"] * summary["window_calls"]
                        summary.update(flops=total, tflop=round(total / 1e12, 1),
                                       achieved_tflops=round(total / summary["seconds"] / 1e12, 1))
                    if args.phases:
                        summary["phases_ms"] = w.ask("phases")["milliseconds"]
                    if args.syncs:
                        summary["syncs"] = w.ask("syncs")
                    records.emit(**summary)
                if len(workers) == 2:
                    a, b = ([r["seconds"] for r in runs[n]] for n in ("A", "B"))
                    differences = [y - x for x, y in zip(a, b)]
                    records.emit(kind="comparison", **config, a_tree=str(here), b_tree=str(other or here),
                                 b_env=compare_env, a_seconds=round(statistics.median(a), 3),
                                 b_seconds=round(statistics.median(b), 3),
                                 b_minus_a_median=round(statistics.median(differences), 3),
                                 b_minus_a_each_round=[round(d, 3) for d in differences],
                                 a_spread=round(max(a) - min(a), 3), b_spread=round(max(b) - min(b), 3))
            finally:
                for w in workers:
                    w.close()


def table(records: common.Records) -> str:
    lines = ["| tree | compile | allocator | frames | seconds (median) | runs | peak GiB allocated / reserved | "
             "TFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    for r in records.items:
        if r["kind"] == "job":
            lines.append(f"| {r['name']} | {r['compile']} | {r['allocator']} | {r['frames']} | {r['seconds']} | "
                         f"{' / '.join(str(s) for s in r['runs'])} | {r['peak_allocated_gib']} / "
                         f"{r['peak_reserved_gib']} | {r.get('achieved_tflops', '')} |")
    for r in records.items:
        if r["kind"] == "comparison":
            lines.append(f"\nB - A ({r['compile']}, {r['allocator']}): median {r['b_minus_a_median']:+.3f} s, "
                         f"each round {r['b_minus_a_each_round']}; spread of A's runs {r['a_spread']} s, "
                         f"of B's {r['b_spread']} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3, help="timed jobs per tree and configuration (default 3)")
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps (30: the official 31 timesteps)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--decode-chunk", type=int, default=4, help="frames per VAE decode batch (the pack's 4)")
    parser.add_argument("--dtype", choices=common.DTYPES, default="bf16")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--compile", nargs="+", choices=("off", "regional", "whole"), default=["off", "regional"],
                        help="uncompiled (the Load node's default), regional torch.compile (--compile), whole "
                             "networks compiled; default: off regional")
    parser.add_argument("--allocator", nargs="+", choices=list(common.ALLOCATORS), default=["native", "async"],
                        help="native: PyTorch's caching allocator; async: cudaMallocAsync (ComfyUI's default, no "
                             "CUDA graphs); expandable: expandable segments (the command line's setting); "
                             "default: native async")
    parser.add_argument("--low-vram", action="store_true", help="the low-VRAM placement (--low-vram, vram: low)")
    parser.add_argument("--attention", choices=("auto", "xformers", "sdpa", "math"), default="auto")
    parser.add_argument("--cuda-graphs", type=int, choices=(0, 1), default=1)
    parser.add_argument("--compare-with", type=Path, default=None, metavar="DIR",
                        help="another checkout: its xportrait_core is timed as B, alternating with this tree's (A)")
    parser.add_argument("--compare-env", nargs="+", default=[], metavar="KEY=VALUE",
                        help="environment for B only (B is this tree unless --compare-with is given)")
    parser.add_argument("--env", nargs="+", default=[], metavar="KEY=VALUE", help="environment for A and B")
    parser.add_argument("--phases", action="store_true", help="after the timed jobs, one more timed phase by phase")
    parser.add_argument("--syncs", action="store_true",
                        help="count the host-device synchronisations of a 2-step job, by source line")
    parser.add_argument("--flops", action="store_true", help="count the job's FLOPs (eagerly) for TFLOP/s")
    parser.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings, e.g. coordinate_descent_tuning=True")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu with --config tiny for a smoke test")
    parser.add_argument("--config", choices=("official", "tiny"), default="official")
    parser.add_argument("--json", type=Path, default=None, help="also write all records to this file")
    # A worker's own arguments (started by the parent, not by hand).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compile-mode", default="off", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    if args.compare_with is not None and not (args.compare_with / "xportrait_core" / "__init__.py").is_file():
        raise SystemExit(f"--compare-with {args.compare_with}: no xportrait_core package there")
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    if args.device == "cpu" and set(args.allocator) - {"native"}:
        args.allocator = ["native"]  # the CPU has no CUDA allocator to choose
    records = common.Records()
    measure(args, records)
    records.write(args.json)
    print("\n" + table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
