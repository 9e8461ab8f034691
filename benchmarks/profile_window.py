#!/usr/bin/env python3
"""Where one guided window call's GPU time goes, on the full-size model with random weights (CUDA).

One window call is what every sampling step repeats: the reference net at batch 1, both ControlNets on the
encoded hint features, both guidance branches in one UNet batch. This script prints, for the model as a user's job
runs it (channels-last; `--compile` as the command line's), the call's top CUDA kernels and their time by kind with
the FLOP rate each kind achieves (`torch.profiler`); optionally the time by op and by the pack's function that
launched it (`--sources`, eager only), by block kind from CUDA events (`--breakdown`), one call of each network
(`--networks`), and one VAE decode chunk (`--decode`). Profile tables are appended to $OUT/profiles.txt too.

    python benchmarks/profile_window.py --compile regional --decode
    python benchmarks/profile_window.py --cuda-graphs 0 --sources     # which functions launch the kernels
    XPORTRAIT_GROUP_NORM_KERNEL=0 python benchmarks/profile_window.py # the switches of the README apply

Prints one JSON object per measurement; --json also writes them to a file.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402

common.use_tree()

from xportrait_core.model.xportrait import XPortrait  # noqa: E402

RECORDS = common.Records()
emit = RECORDS.emit
sync = common.sync
cuda_time = common.cuda_time

def window_inputs(model: XPortrait, resolution: int, frames: int):
    """Random (window latents, reference latent, hint images, context) of one window, on the model's device."""
    device, dtype = model.device, model.dtype
    h = resolution // 8
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(frames, 4, h, h, device=device, generator=g, dtype=dtype)
    ref = torch.randn(1, 4, h, h, device=device, generator=g, dtype=dtype)
    hint = torch.rand(frames, 3, resolution, resolution, device=device, generator=g, dtype=dtype) * 2 - 1
    ctx = torch.randn(1, 77, model.config.unet.context_dim, device=device, generator=g, dtype=dtype)
    return x, ref, hint, ctx


def bench_networks(model: XPortrait, resolution: int, frames: int = 16, repeats: int = 5, warmup: int = 2):
    """One call of each network on a 16-frame window: the per-step budget."""
    device = model.device
    x, ref, hint, ctx = window_inputs(model, resolution, frames)
    t = torch.full((frames,), 500, device=device)
    with torch.no_grad():
        bank = model.reference_bank(ref, 500, ctx)
        residuals = model.global_control(x, hint, t, ctx)
        calls = {
            "reference_net (batch 1)": lambda: model.reference_bank(ref, 500, ctx),
            "global_control": lambda: model.global_control(x, hint, t, ctx),
            "local_control": lambda: model.local_control(x, hint, t, ctx),
            "unet cond (bank + control)":
                lambda: model.unet(x, t, ctx, control=residuals, **{common.unet_bank_keyword(model): bank}),
            "unet uncond": lambda: model.unet(x, t, ctx),
            "both branches (controls + both branches in one UNet batch)":
                lambda: common.eps_both_branches(model)(x, 500, ctx, ctx, bank, hint, hint),
            "eps_cond (all of the above)": lambda: model.eps_cond(x, 500, ctx, model.reference_bank(ref, 500, ctx), hint, hint),
            "vae decode 16 frames": lambda: model.decode_latents(x.float()),
        }
        for name, fn in calls.items():
            emit(kind="network", name=name, seconds=round(cuda_time(fn, repeats, warmup), 4), frames=frames, dtype=str(model.dtype))


def window_probe(model: XPortrait, resolution: int, frames: int = 16):
    """A fixed guided window call, to compare two ways of running the same weights."""
    job = common.VideoJob(model, frames, resolution)
    device = model.device
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(1, 4, resolution // 8, resolution // 8, generator=g).to(device)
    x = torch.randn(frames, 4, resolution // 8, resolution // 8, generator=g).to(device)

    @torch.no_grad()
    def call():
        denoise = common.window_denoiser(model, ref, global_hint=job.global_hint, local_hint=job.local_hint,
                                 guidance_scale=5.0, context=job.context.to(device),
                                 uncond_context=job.context.to(device))
        return denoise(x, 500, torch.arange(frames)).float()

    return call


# Kernel-name patterns, in order: the first that matches names a kernel's kind in `--profile`'s summary.
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attn", "frame_attention", "sdpa")),
    ("inductor fused", ("triton_",)),
    ("convolutions", ("conv", "implicit", "fprop", "winograd", "dgrad")),
    ("matrix products", ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "cublas")),
    ("normalisation", ("group_norm", "layer_norm", "groupnorm", "layernorm")),
    ("copies and concatenation", ("copy", "cat", "transpose", "permute", "contiguous")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, patterns in KERNEL_KINDS:
        if any(p in lowered for p in patterns):
            return kind
    return "other"


def kernel_kind_totals(kernels) -> dict[str, float]:
    """Milliseconds per kernel kind from (name, microseconds) pairs, largest first."""
    totals: dict[str, float] = {}
    for name, micros in kernels:
        kind = kernel_kind(name)
        totals[kind] = totals.get(kind, 0.0) + micros / 1000
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def profiled_kernels(device: torch.device, fn, what: str) -> dict[str, float]:
    """Run `fn` once under the profiler: print its top kernels (appended to $OUT/profiles.txt too), emit and
    return the milliseconds per kernel kind. On the CPU its ops stand in for kernels (for smoke tests)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total" if on_cuda else "cpu_time_total", row_limit=30,
                                      max_name_column_width=90)
    print(table)
    common.keep_text("profiles.txt", f"{what}\n{table}\n")
    kernels = [(e.key, e.self_device_time_total if on_cuda else e.self_cpu_time_total) for e in prof.key_averages()]
    milliseconds = kernel_kind_totals(kernels)
    emit(kind="profile", what=what, total_cuda_ms=round(sum(us for _, us in kernels) / 1000, 2), **milliseconds)
    return milliseconds


def time_by_source(ops, package: str = "xportrait_core", limit: int = 25) -> list[dict]:
    """Kernel time by op and by the function that called it: `ops` are (op name, enclosing Python frames innermost
    first, microseconds); the function is the innermost frame in `package` outside its `fast/` layers (a fast
    layer's forward stands for the layer the model called), else the innermost frame. A frame reads
    "file(line the function starts at): name", as the profiler's Python tracer names it. Largest first."""
    totals: dict[tuple[str, str], list] = {}
    for name, stack, us in ops:
        if us <= 0:
            continue
        frames = [f for f in stack if package in f] or list(stack) or ["(no Python stack)"]
        frames = [f for f in frames if f"{package}/fast/" not in f] or frames
        entry = totals.setdefault((name, frames[0]), [0.0, 0])
        entry[0] += us
        entry[1] += 1
    rows = [{"op": name, "where": where, "ms": round(us / 1000, 3), "calls": calls}
            for (name, where), (us, calls) in totals.items()]
    return sorted(rows, key=lambda r: -r["ms"])[:limit]


def profiled_sources(device: torch.device, fn, what: str) -> list[dict]:
    """Run `fn` once under the profiler with Python stacks: which of the pack's functions launch the kernel time
    (ops run eagerly only: a replayed CUDA graph has no Python stack, so run with --cuda-graphs 0)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with torch.no_grad(), profile(activities=activities, with_stack=True) as prof:
        fn()
        sync()

    def python_frame(event) -> bool:  # the profiler's Python tracer records each Python call as an event
        return ".py(" in event.name or event.name.startswith("<built-in")

    def enclosing_frames(event) -> list[str]:
        frames, parent = [], event.cpu_parent
        while parent is not None:
            if python_frame(parent):
                frames.append(parent.name)
            parent = parent.cpu_parent
        return frames

    ops = [(e.name, enclosing_frames(e), e.self_device_time_total if on_cuda else e.self_cpu_time_total)
           for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and not python_frame(e)]
    rows = time_by_source(ops)
    lines = [f"{what}: kernel time by op and the pack's function that ran it"] + [
        f"{r['ms']:9.3f} ms {r['calls']:5d}x  {r['op']:<40.40} {r['where']}" for r in rows]
    print("\n".join(lines))
    common.keep_text("profiles.txt", "\n".join(lines) + "\n\n")
    emit(kind="profile_sources", what=what, rows=rows)
    return rows


def emit_rates(what: str, flops: dict[str, int], milliseconds: dict[str, float]) -> None:
    """What each kind of kernel achieves: the FLOPs of a profiled call by kind over that kind's kernel time."""
    emit(kind="profile_rates", what=what, tflop=round(sum(flops.values()) / 1e12, 2),
         **{f"{kind} TFLOP/s": round(flops[kind] / 1e12 / (milliseconds[kind] / 1e3))
            for kind in flops if milliseconds.get(kind)})


def profile_window(model: XPortrait, resolution: int, frames: int = 16, sources: bool = False):
    """Top CUDA kernels of one guided window call (reference net, both ControlNets, both UNet passes)."""
    job = common.VideoJob(model, frames, resolution)
    device = model.device
    ref = torch.randn(1, 4, resolution // 8, resolution // 8, device=device)
    denoise = common.window_denoiser(model, ref, global_hint=job.global_hint, local_hint=job.local_hint, guidance_scale=5.0,
                             context=job.context.to(device), uncond_context=job.context.to(device))
    x = torch.randn(frames, 4, resolution // 8, resolution // 8, device=device)
    idx = torch.arange(frames)
    with torch.no_grad():
        for t in (500, 501):
            denoise(x, t, idx)
        sync()
    what = f"guided window call ({frames} frames)"
    milliseconds = profiled_kernels(device, lambda: denoise(x, 502, idx), what)
    if sources:
        profiled_sources(device, lambda: denoise(x, 503, idx), what)
    common.release(denoise)  # its graphs' pool, back to the driver: else it would count in the next video's peak
    emit_rates(what, window_flops_by_kind(model, resolution, frames), milliseconds)


def bench_banks(model: XPortrait, resolution: int, steps: int = 30, repeats: int = 3, warmup: int = 1) -> dict:
    """The reference banks of every timestep of a job: computed one timestep at a time (a reference-net call at
    batch 1 per step, as sampling with CUDA graphs does) against `sampling/batched_banks.py` (16 timesteps a call,
    the default without graphs, and all in one call), in median seconds for all of them, and the device memory
    one chunk of banks holds."""
    from xportrait_core.sampling.batched_banks import DEFAULT_CHUNK, BatchedReferenceBanks
    from xportrait_core.sampling.branches import ReferenceBanks
    from xportrait_core.sampling.sampler import ddim_timesteps

    _, ref, _, ctx = window_inputs(model, resolution, 1)
    walk = [int(t) for t in ddim_timesteps(steps).flip(0)]
    result = {"timesteps": len(walk)}
    source = ReferenceBanks(model, ref, ctx)

    def batched(chunk: int):
        banks = BatchedReferenceBanks(source, walk, chunk=chunk)
        return [banks(t) for t in walk]

    with torch.no_grad():
        result["one at a time s"] = round(cuda_time(lambda: [model.reference_bank(ref, t, ctx) for t in walk],
                                                    repeats, warmup), 4)
        for chunk in (DEFAULT_CHUNK, len(walk)):
            result[f"{chunk} a call s"] = round(cuda_time(lambda: batched(chunk), repeats, warmup), 4)
        one_chunk = batched(DEFAULT_CHUNK)[:DEFAULT_CHUNK]
        result["one chunk of banks MiB"] = round(sum(e.numel() * e.element_size() for bank in one_chunk
                                                     for e in bank.entries) / 2**20, 1)
    emit(kind="banks", **result)
    return result


def profile_decode(model: XPortrait, resolution: int, chunk: int):
    """Top CUDA kernels of one VAE decode of `chunk` frames (after a warm-up decode), with rates by kind."""
    from torch.utils.flop_counter import FlopCounterMode

    from xportrait_core.fast.offload import resident

    latents = torch.randn(chunk, 4, resolution // 8, resolution // 8, device=model.device)
    what = f"vae decode ({chunk} frames)"
    with resident(model, "vae"), torch.no_grad():
        model.decode_latents(latents, chunk=chunk)
        milliseconds = profiled_kernels(model.device, lambda: model.decode_latents(latents, chunk=chunk), what)
        stance = getattr(torch.compiler, "set_stance", None)
        with (stance("force_eager") if stance else contextlib.nullcontext()), FlopCounterMode(display=False) as counter:
            model.decode_latents(latents, chunk=chunk)
    emit_rates(what, flops_by_kind(counter), milliseconds)


# FLOP-counted ops by the kernel kind that runs them (attention along frames runs the pack's own kernel, which the
# counter does not see; it is a fraction of a TFLOP a window).
OP_KINDS = {"convolution": "convolutions", "mm": "matrix products", "addmm": "matrix products",
            "bmm": "matrix products", "_scaled_dot_product_cudnn_attention": "attention",
            "_scaled_dot_product_flash_attention": "attention", "_scaled_dot_product_efficient_attention": "attention",
            "_scaled_dot_product_flash_attention_for_cpu": "attention"}


def window_flops_by_kind(model: XPortrait, resolution: int, frames: int = 16) -> dict[str, int]:
    """FLOPs of one guided window call (reference net, ControlNets on encoded hints, both UNet branches) by kernel
    kind, counted eagerly (CUDA graph replays and compiled regions hide their ops from the counter). PyTorch's
    counter knows SDPA's CUDA kernels but not its CPU one: on the CPU, attention goes uncounted."""
    from torch.utils.flop_counter import FlopCounterMode

    x, ref, hint, ctx = window_inputs(model, resolution, frames)
    stance = getattr(torch.compiler, "set_stance", None)
    with torch.no_grad(), (stance("force_eager") if stance else contextlib.nullcontext()):
        global_features, local_features = model.encode_motion_hints(hint, hint)
        with FlopCounterMode(display=False) as counter:
            bank = model.reference_bank(ref, 500, ctx)
            common.eps_both_branches(model)(x, 500, ctx, ctx, bank, global_features, local_features,
                                            hints_encoded=True)
    return flops_by_kind(counter)


def flops_by_kind(counter) -> dict[str, int]:
    """A FlopCounterMode's global counts summed by kernel kind (OP_KINDS)."""
    totals: dict[str, int] = {}
    for op, count in counter.get_flop_counts()["Global"].items():
        kind = OP_KINDS.get(str(op).removeprefix("aten.").split(".")[0], "other")
        totals[kind] = totals.get(kind, 0) + count
    return totals


def breakdown_window(model: XPortrait, resolution: int, frames: int = 16):
    """GPU milliseconds of one guided window call by kind of block and network, from CUDA events around every
    block call (eager or compiled blocks alike; a compiled block is timed as a whole)."""
    from xportrait_core.model.blocks import Attention, FeedForward, ResBlock, SpatialTransformer
    from xportrait_core.model.temporal import MotionModule, TemporalSelfAttention

    kinds = [(TemporalSelfAttention, "temporal attention"), (Attention, "spatial attention"),
             (FeedForward, "feed-forward"), (ResBlock, "ResBlock"), (SpatialTransformer, "spatial transformer (all)"),
             (MotionModule, "motion module (all)")]
    events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
    handles = []

    def label_of(network: str, name: str, module) -> str | None:
        for cls, kind in kinds:
            if isinstance(module, cls):
                if isinstance(module, Attention) and not isinstance(module, TemporalSelfAttention):
                    kind += " (self)" if name.endswith("attn1") else " (cross)"
                if isinstance(module, FeedForward):
                    kind += " (temporal)" if "motion_modules" in name else " (spatial)"
                return f"{network}: {kind}"
        return None

    for network in ("unet", "reference_net", "global_control", "local_control"):
        for name, module in [(network, getattr(model, network))] + list(getattr(model, network).named_modules()):
            label = f"{network}: whole network" if module is getattr(model, network) else label_of(network, name, module)
            if label is None:
                continue
            stack = []

            def pre(_m, _a, stack=stack):
                start = torch.cuda.Event(enable_timing=True)
                start.record()
                stack.append(start)

            def post(_m, _a, _o, stack=stack, label=label):
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                events.append((label, stack.pop(), end))

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    call = window_probe(model, resolution, frames)
    call()
    events.clear()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    sync()
    for h in handles:
        h.remove()
    totals: dict[str, float] = {}
    for label, a, b in events:
        totals[label] = totals.get(label, 0.0) + a.elapsed_time(b)
    emit(kind="breakdown", window_ms=round(start.elapsed_time(end), 2),
         **{k: round(v, 2) for k, v in sorted(totals.items())})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=common.DTYPES, default="bf16")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--frames", type=int, default=16, help="frames of the window (16)")
    parser.add_argument("--compile", choices=("off", "regional", "whole"), default="off")
    parser.add_argument("--low-vram", action="store_true")
    parser.add_argument("--cuda-graphs", type=int, choices=(0, 1), default=1,
                        help="0: the call runs eagerly (needed by --sources: a replayed graph has no Python stack)")
    parser.add_argument("--sources", action="store_true",
                        help="also the call's kernel time by op and by the pack's function that ran it")
    parser.add_argument("--breakdown", action="store_true", help="GPU time of one call by block kind (CUDA events)")
    parser.add_argument("--networks", action="store_true", help="median time of one call of each network")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each network (after 2 warm-ups)")
    parser.add_argument("--banks", action="store_true",
                        help="time every timestep's reference bank one at a time against one batched call")
    parser.add_argument("--decode", action="store_true", help="also profile one VAE decode of --decode-chunk frames")
    parser.add_argument("--decode-chunk", type=int, default=4)
    parser.add_argument("--allocator", choices=list(common.ALLOCATORS), default="expandable",
                        help="CUDA allocator (default: the command line's); an existing PYTORCH_CUDA_ALLOC_CONF wins")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu with --config tiny for a smoke test")
    parser.add_argument("--config", choices=("official", "tiny"), default="official")
    parser.add_argument("--json", type=Path, default=None, help="also write all records to this file")
    args = parser.parse_args(argv)
    if args.sources and args.device == "cuda" and args.cuda_graphs:
        raise SystemExit("--sources needs --cuda-graphs 0: a replayed CUDA graph has no Python stack")
    common.restart_with_allocator(args.allocator)
    common.require_device(args.device, "profile_window.py")
    os.environ["XPORTRAIT_CUDA_GRAPHS"] = str(args.cuda_graphs)
    common.fast_math()
    model = common.build_random_model(args.config, common.DTYPES[args.dtype], args.device)
    common.speed_up(model, channels_last=args.device == "cuda", compile_mode=args.compile, low_vram=args.low_vram)
    profile_window(model, args.resolution, args.frames, sources=args.sources)
    if args.decode:
        profile_decode(model, args.resolution, args.decode_chunk)
    if args.breakdown:
        breakdown_window(model, args.resolution, args.frames)
    if args.banks:
        bench_banks(model, args.resolution, repeats=args.repeats, warmup=min(1, args.repeats))
    if args.networks:
        bench_networks(model, args.resolution, args.frames, repeats=args.repeats, warmup=min(2, args.repeats))
    RECORDS.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
