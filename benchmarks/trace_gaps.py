"""Where a profiled run's device waits for the host: the gaps between kernels on the GPU timeline of a chrome trace
(bench_comfy.py --profile DIR --profile-trace), each with the innermost pack or ComfyUI Python frames the host was in
meanwhile.

    python benchmarks/trace_gaps.py DIR/trace_lcm.json.gz [--min-ms 1] [--top 30]
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """Busy intervals (µs) of kernels and copies on the device, merged across streams."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def host_frames(events: list[dict], start: float, end: float, keep: tuple[str, ...]) -> collections.Counter:
    """Host time (µs) inside [start, end) by the innermost Python frame whose file matches `keep`."""
    frames = [e for e in events if e.get("ph") == "X" and e.get("cat") == "python_function"
              and any(k in e.get("name", "") for k in keep)
              and e["ts"] < end and e["ts"] + e.get("dur", 0) > start]
    counts: collections.Counter = collections.Counter()
    # Innermost = shortest frame covering each moment: attribute each frame's overlap minus its children's.
    frames.sort(key=lambda e: e.get("dur", 0))
    covered: list[tuple[float, float]] = []
    for e in frames:
        a, b = max(e["ts"], start), min(e["ts"] + e.get("dur", 0), end)
        own = b - a - sum(max(0.0, min(b, y) - max(a, x)) for x, y in covered)
        if own > 0:
            counts[e["name"]] += own
        covered.append((a, b))
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--min-ms", type=float, default=1.0, help="gaps at least this long")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--keep", nargs="+", default=["xportrait", "comfy", "nodes.py", "bench_comfy"],
                        help="fragments of the Python files whose frames count")
    args = parser.parse_args(argv)
    events = load(args.trace)
    busy = device_intervals(events)
    if not busy:
        raise SystemExit("no device activity in this trace")
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    start = min([busy[0][0]] + [e["ts"] for e in host])
    end = max([busy[-1][1]] + [e["ts"] + e.get("dur", 0) for e in host])
    busy_us = sum(b - a for a, b in busy)
    gaps = [(a, b) for (_, a), (b, _) in zip([(start, start)] + busy, busy + [(end, end)]) if b - a >= args.min_ms * 1e3]
    print(f"span {(end - start) / 1e3:.1f} ms, device busy {busy_us / 1e3:.1f} ms, "
          f"{len(gaps)} gaps of {args.min_ms} ms or more: {sum(b - a for a, b in gaps) / 1e3:.1f} ms")
    total: collections.Counter = collections.Counter()
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:args.top]:
        frames = host_frames(events, a, b, tuple(args.keep))
        total.update(frames)
        top = ", ".join(f"{name.split('(')[0][-60:]} {us / 1e3:.1f}" for name, us in frames.most_common(3))
        print(f"  at {(a - start) / 1e3:8.1f} ms: gap {(b - a) / 1e3:6.1f} ms  | {top}")
    print("host frames over all listed gaps (ms):")
    for name, us in total.most_common(args.top):
        print(f"  {us / 1e3:8.1f}  {name[:150]}")
    print("operators and CUDA runtime calls overlapping the listed gaps (ms, nested ones counted in each):")
    calls: collections.Counter = collections.Counter()
    listed = sorted(gaps, key=lambda g: g[0] - g[1])[:args.top]
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver"):
            a, b = e["ts"], e["ts"] + e.get("dur", 0)
            overlap = sum(max(0.0, min(b, y) - max(a, x)) for x, y in listed)
            if overlap > 0:
                calls[e["name"]] += overlap
    for name, us in calls.most_common(args.top):
        print(f"  {us / 1e3:8.1f}  {name[:150]}")


if __name__ == "__main__":
    main()
