#!/usr/bin/env python3
"""Speed and memory of X-Portrait on a CUDA GPU: the whole sampler, and one call of each network.

The full-size `official()` model is built with random weights on the GPU (speed does not depend on the weight
values). A video run is what a user's job does after face preprocessing: VAE-encode the reference, noise it to
t=999 for every frame, DDIM over the official 30-step schedule (31 timesteps) with guidance 5 in 16-frame
windows, and VAE-decode every frame. Warm-up runs are excluded; the median of the timed runs is reported.

    python benchmarks/bench_gpu.py --frames 16 64 --runs 3 --dtype bf16
    python benchmarks/bench_gpu.py --check-golden GOLDEN_DIR      # fast path vs the official fp32 fixtures

Prints one JSON object per measurement and a table at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xportrait_core.model import attention  # noqa: E402
from xportrait_core.cli import DEFAULT_CUDA_ALLOC_CONF  # noqa: E402
from xportrait_core.model.config import XPortraitConfig  # noqa: E402
from xportrait_core.fast.cuda_graphs import with_cuda_graphs  # noqa: E402
from xportrait_core.sampling.guidance import GuidedDenoiser  # noqa: E402
from xportrait_core.model.xportrait import XPortrait  # noqa: E402
from xportrait_core.sampling.pipeline import animate_latents, decode_frames  # noqa: E402
from xportrait_core.sampling.sampler import ddim_timesteps, sample_ddim  # noqa: E402
from xportrait_core.model.schedule import q_sample  # noqa: E402
from xportrait_core.model.dtypes import PRECISIONS, dtype_named  # noqa: E402
from xportrait_core.fast import frame_attention  # noqa: E402
from xportrait_core.fast.operations import fast_operations  # noqa: E402
from xportrait_core.fast.prepare import prepare_model  # noqa: E402
ALLOCATORS = {"expandable": DEFAULT_CUDA_ALLOC_CONF, "native": "", "async": "backend:cudaMallocAsync"}
RESULTS: list[dict] = []


def emit(**record):
    RESULTS.append(record)
    print(json.dumps(record), flush=True)


def build_random_model(config: XPortraitConfig, dtype: torch.dtype, device: str) -> XPortrait:
    torch.manual_seed(0)
    with torch.device(device):
        model = XPortrait(config, with_text_encoder=False, operations=fast_operations())
    return model.to(dtype).eval().requires_grad_(False)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_time(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` runs (host clock around a device sync)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class VideoJob:
    """Random inputs of one video, and the user's job on them."""

    def __init__(self, model: XPortrait, frames: int, resolution: int, seed: int = 999, decode_chunk: int = 16):
        self.decode_chunk = decode_chunk
        g = torch.Generator().manual_seed(seed)
        self.model = model
        self.frames = frames
        self.reference = torch.rand(1, 3, resolution, resolution, generator=g) * 2 - 1
        self.global_hint = torch.rand(frames, 3, resolution, resolution, generator=g) * 2 - 1
        self.local_hint = torch.rand(frames, 3, resolution, resolution, generator=g) * 2 - 1
        self.context = torch.randn(1, 77, model.config.unet.context_dim, generator=g)
        self.seed = seed

    @torch.no_grad()
    def run(self, steps: int = 30, guidance: float = 5.0, overlap: int = 4, window: int = 16, decode: bool = True):
        """The user's pipeline (pipeline.animate_latents + decode_frames) on these inputs, frames to host memory."""
        reference = ((self.reference[0].permute(1, 2, 0) + 1) / 2).numpy()
        latents = animate_latents(self.model, reference, global_hint=self.global_hint, local_hint=self.local_hint,
                                  steps=steps, guidance_scale=guidance, overlap=overlap, window=window, seed=self.seed,
                                  context=self.context, uncond_context=self.context)
        if decode:
            return decode_frames(self.model, latents, chunk=self.decode_chunk)
        return latents


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


def bench_networks(model: XPortrait, resolution: int, frames: int = 16):
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
            "unet cond (bank + control)": lambda: model.unet(x, t, ctx, bank=bank, control=residuals),
            "unet uncond": lambda: model.unet(x, t, ctx),
            "eps_branches (controls + both branches in one UNet batch)":
                lambda: model.eps_branches(x, 500, ctx, ctx, bank, hint, hint),
            "eps_cond (all of the above)": lambda: model.eps_cond(x, 500, ctx, model.reference_bank(ref, 500, ctx), hint, hint),
            "vae decode 16 frames": lambda: model.decode_latents(x.float()),
        }
        for name, fn in calls.items():
            emit(kind="network", name=name, seconds=round(cuda_time(fn), 4), frames=frames, dtype=str(model.dtype))


def apply_variant(model: XPortrait, step: str, args) -> None:
    if step == "eager":
        return
    if step == "low_vram":
        prepare_model(model, low_vram=True)
        emit(kind="variant", step=step, vram_after_placing_gib=round(torch.cuda.memory_allocated() / 2**30, 2))
        return
    probe = window_probe(model, args.resolution)
    before = probe()
    start = time.perf_counter()
    if step == "channels_last":
        prepare_model(model, channels_last=True)
    else:
        prepare_model(model, compile=True, compile_mode=args.compile_mode, regional=step == "compile")
    after = probe()  # compiles, for the compile variants
    sync()
    emit(kind="variant", step=step, seconds_to_apply=round(time.perf_counter() - start, 1),
         rel_diff_vs_previous=float((after - before).norm() / before.norm()))


def window_probe(model: XPortrait, resolution: int, frames: int = 16):
    """A fixed guided window call, to compare two ways of running the same weights."""
    job = VideoJob(model, frames, resolution)
    device = model.device
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(1, 4, resolution // 8, resolution // 8, generator=g).to(device)
    x = torch.randn(frames, 4, resolution // 8, resolution // 8, generator=g).to(device)

    @torch.no_grad()
    def call():
        denoise = with_cuda_graphs(GuidedDenoiser.for_model(
            model, ref, global_hint=job.global_hint, local_hint=job.local_hint, guidance_scale=5.0,
            context=job.context.to(device), uncond_context=job.context.to(device)))
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


def keep_profile(text: str) -> None:
    """Append a profile's table to $OUT/profiles.txt, where the device tool brings files back from."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "profiles.txt"), "a") as f:
            f.write(text)


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
    keep_profile(f"{what}\n{table}\n")
    kernels = [(e.key, e.self_device_time_total if on_cuda else e.self_cpu_time_total) for e in prof.key_averages()]
    milliseconds = kernel_kind_totals(kernels)
    emit(kind="profile", what=what, total_cuda_ms=round(sum(us for _, us in kernels) / 1000, 2), **milliseconds)
    return milliseconds


def time_by_source(ops, package: str = "xportrait_core", limit: int = 25) -> list[dict]:
    """Kernel time by op and by the function that called it: `ops` are (op name, enclosing Python frames innermost
    first, microseconds); the function is the innermost frame in `package`, else the innermost frame. A frame reads
    "file(line the function starts at): name", as the profiler's Python tracer names it. Largest first."""
    totals: dict[tuple[str, str], list] = {}
    for name, stack, us in ops:
        if us <= 0:
            continue
        frames = [f for f in stack if package in f] or list(stack) or ["(no Python stack)"]
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
    keep_profile("\n".join(lines) + "\n\n")
    emit(kind="profile_sources", what=what, rows=rows)
    return rows


def emit_rates(what: str, flops: dict[str, int], milliseconds: dict[str, float]) -> None:
    """What each kind of kernel achieves: the FLOPs of a profiled call by kind over that kind's kernel time."""
    emit(kind="profile_rates", what=what, tflop=round(sum(flops.values()) / 1e12, 2),
         **{f"{kind} TFLOP/s": round(flops[kind] / 1e12 / (milliseconds[kind] / 1e3))
            for kind in flops if milliseconds.get(kind)})


def profile_window(model: XPortrait, resolution: int, frames: int = 16, sources: bool = False):
    """Top CUDA kernels of one guided window call (reference net, both ControlNets, both UNet passes)."""
    job = VideoJob(model, frames, resolution)
    device = model.device
    ref = torch.randn(1, 4, resolution // 8, resolution // 8, device=device)
    denoise = with_cuda_graphs(GuidedDenoiser.for_model(
        model, ref, global_hint=job.global_hint, local_hint=job.local_hint, guidance_scale=5.0,
        context=job.context.to(device), uncond_context=job.context.to(device)))
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
    denoise.release()  # its graphs' pool, back to the driver: else it would count in the next video's peak
    emit_rates(what, window_flops_by_kind(model, resolution, frames), milliseconds)


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
            model.eps_branches(x, 500, ctx, ctx, bank, global_features, local_features, hints_encoded=True)
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


def job_phases(job: VideoJob, steps: int = 30, overlap: int = 4, batched_banks: bool = False) -> dict:
    """Milliseconds of GPU timeline per phase of one video job, from CUDA events between the pipeline's stages
    (the same calls as `VideoJob.run`, spelled out as `pipeline.animate_latents` makes them, low-VRAM mode
    included): where a job's time goes besides its steady window steps.
    A step's figure is the time since the previous step ended, so the first step holds its eager run and the
    second the recording of CUDA graphs (the GPU idles while the host records). batched_banks: every timestep's
    bank from one batched reference-net call before sampling (sampling/batched_banks.py), to time that source."""
    from xportrait_core.fast import offload
    from xportrait_core.sampling.batched_banks import BatchedReferenceBanks
    from xportrait_core.fast.cuda_graphs import graphs_apply
    from xportrait_core.sampling.initial_latents import encode_reference, reference_initial_latents
    from xportrait_core.sampling.pipeline import decode_frames, images_to_tensor

    model, device = job.model, job.model.device
    on_cuda = device.type == "cuda"
    marks: list[tuple[str, object, float]] = []

    def mark(name: str):
        event = torch.cuda.Event(enable_timing=True) if on_cuda else None
        if event is not None:
            event.record()
        marks.append((name, event, time.perf_counter()))

    generator = torch.Generator().manual_seed(job.seed)
    reference = images_to_tensor(((job.reference[0].permute(1, 2, 0) + 1) / 2).numpy(), "reference")
    with torch.no_grad():
        sync()
        mark("start")
        with offload.resident(model, "vae"):
            reference_latents = encode_reference(model, reference, generator)
            x_T = reference_initial_latents(model, reference[:1], job.frames, generator)
        mark("vae encode and x_T")
        low_vram = offload.is_low_vram(model)
        denoiser = GuidedDenoiser.for_model(model, reference_latents, global_hint=job.global_hint,
                                            local_hint=job.local_hint, guidance_scale=5.0,
                                            context=job.context.to(device), uncond_context=job.context.to(device),
                                            batch_branches=not low_vram)
        mark("denoiser set-up (hint features)")
        timesteps = ddim_timesteps(steps)
        if low_vram:
            branches = denoiser.branches
            with offload.resident(model, "reference_net"):
                branches.banks = offload.precompute_reference_banks(branches.banks, timesteps,
                                                                    cuda_graphs=graphs_apply(model.device))
            mark("reference banks of every timestep (low-VRAM)")
        elif batched_banks:
            denoiser.branches.banks = BatchedReferenceBanks(denoiser.branches.banks, timesteps)
            mark("reference banks of every timestep (one batched call)")
        denoiser = with_cuda_graphs(denoiser)
        latents = sample_ddim(denoiser, x_T, model.alphas_cumprod, timesteps, window=16,
                              overlap=overlap, generator=generator,
                              callback=lambda done, total: mark(f"window call {done}"))
        denoiser.release()
        mark("release graphs")
        decode_frames(model, latents, chunk=job.decode_chunk)
        mark("vae decode to host")
        sync()
    names = [name for name, _, _ in marks]
    host = [(marks[i][2] - marks[i - 1][2]) * 1000 for i in range(1, len(marks))]
    gpu = [marks[i - 1][1].elapsed_time(marks[i][1]) for i in range(1, len(marks))] if on_cuda else host
    calls = [i for i, name in enumerate(names[1:]) if name.startswith("window call")]
    steady = [gpu[i] for i in calls[2:]]
    phases = {name: round(gpu[i], 1) for i, name in enumerate(names[1:]) if i not in calls[2:]}
    phases["later window calls (sum)"] = round(sum(steady), 1)
    phases["later window call (median)"] = round(statistics.median(steady), 2) if steady else None
    phases["total"] = round(sum(gpu), 1)
    phases["host total"] = round(sum(host), 1)
    return phases


def count_flops(job: VideoJob) -> tuple[float, float]:
    """(FLOPs of one sampling timestep, FLOPs of the VAE work) of a video job, counted by
    torch.utils.flop_counter. Sampling FLOPs scale with the number of timesteps; the VAE runs once."""
    from torch.utils.flop_counter import FlopCounterMode

    from xportrait_core.fast.offload import resident

    with resident(job.model, "reference_net"), FlopCounterMode(display=False) as sampling:
        job_run_timesteps(job, [999])
    size = job.reference.shape[-1] // 8
    with resident(job.model, "vae"), FlopCounterMode(display=False) as vae, torch.no_grad():
        job.model.decode_latents(torch.zeros(job.frames, 4, size, size, device=job.model.device))
        job.model.encode_images(job.reference.to(job.model.device), sample=False)
    return sampling.get_total_flops(), vae.get_total_flops()


def job_run_timesteps(job: VideoJob, timesteps):
    """Sampling over exactly these timesteps (no VAE), for counting."""
    model, device = job.model, job.model.device
    ref_latent = torch.zeros(1, 4, job.reference.shape[-1] // 8, job.reference.shape[-1] // 8, device=device)
    denoise = with_cuda_graphs(GuidedDenoiser.for_model(
        model, ref_latent, global_hint=job.global_hint, local_hint=job.local_hint, guidance_scale=5.0,
        context=job.context.to(device), uncond_context=job.context.to(device)))
    x_T = torch.randn(job.frames, *ref_latent.shape[1:], device=device)
    with torch.no_grad():
        sample_ddim(denoise, x_T, model.alphas_cumprod, timesteps, window=16, overlap=4,
                    generator=torch.Generator().manual_seed(0))


def count_syncs(job: "VideoJob") -> tuple[int, dict[str, int]]:
    """Host-device synchronisations during a 2-step sampling run (no VAE): each one stalls kernel launches.
    Returns their number and how many happened at each line (a line that syncs at every step shows 2 or more)."""
    import warnings

    if not torch.cuda.is_available():
        return 0, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            job.run(steps=2, decode=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites: dict[str, int] = {}
    for w in caught:
        if "prototype feature" in str(w.message):
            continue
        site = f"{Path(w.filename).name}:{w.lineno}"
        sites[site] = sites.get(site, 0) + 1
    return sum(sites.values()), dict(sorted(sites.items(), key=lambda kv: -kv[1]))


def bench_video(model: XPortrait, frames: int, resolution: int, runs: int, overlap: int, label: str,
                decode_chunk: int = 16, phases: bool = False, batched_banks: bool = False):
    job = VideoJob(model, frames, resolution, decode_chunk=decode_chunk)
    job.run(steps=2)  # warm-up: kernels, allocator, compiled graphs
    sync()
    syncs, where = count_syncs(job)
    emit(kind="syncs", variant=label, frames=frames, count=syncs, where=where)
    on_cuda = model.device.type == "cuda"
    if on_cuda:
        # Memory cached by earlier work (a profile, another frame count) would stay reserved through the runs and
        # count in their peak: hand it back first, so the peak is this job's.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        job.run(overlap=overlap)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else float("nan")
    # What the allocator held from the driver: CUDA graphs keep their memory pool reserved between replays.
    reserved = torch.cuda.max_memory_reserved() / 2**30 if on_cuda else float("nan")
    median = statistics.median(times)
    if phases:
        emit(kind="phases", variant=label, frames=frames,
             milliseconds=job_phases(job, overlap=overlap, batched_banks=batched_banks))
    # Counted with compiled regions run eagerly: a dispatch mode inside compiled code makes Dynamo recompile every
    # region, and past the recompile limit the later, timed runs (64 frames after 16) would silently run eagerly.
    stance = getattr(torch.compiler, "set_stance", None)
    if stance is not None:
        with stance("force_eager"):
            sampling_flops, vae_flops = count_flops(job)
    else:
        sampling_flops, vae_flops = count_flops(job)
    timesteps = len(ddim_timesteps(30))
    total_flops = sampling_flops * timesteps + vae_flops
    emit(kind="video", variant=label, frames=frames, resolution=resolution, overlap=overlap, timesteps=timesteps,
         decode_chunk=decode_chunk,
         seconds=round(median, 3), seconds_per_frame=round(median / frames, 4), runs=[round(t, 3) for t in times],
         peak_vram_gib=round(peak, 2), peak_reserved_gib=round(reserved, 2), tflop=round(total_flops / 1e12, 1),
         tflop_per_frame_timestep=round(sampling_flops / frames / 1e12, 3),
         achieved_tflops=round(total_flops / median / 1e12, 1),
         attention=attention.resolve_backend(model.device, model.dtype), dtype=str(model.dtype),
         allocator=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") or "native",
         gpu=torch.cuda.get_device_name() if on_cuda else "cpu")


def check_golden(golden: Path, dtype: torch.dtype, fast: bool = False):
    """The fast path (CUDA, this dtype, this attention backend; with fast=True also channels-last and compiled
    blocks) against the official fp32 fixtures."""
    from safetensors.torch import load_file

    from xportrait_core.model.checkpoint import load_xportrait

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Full float32 matrix products here: TF32 would blur the float32 comparison by ~1e-3.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cases = {k: v.to(device) for k, v in load_file(str(golden / "tiny_cases.safetensors")).items()}
    model = load_xportrait(golden / "tiny_official_state_dict.safetensors", dtype=dtype, device=device,
                           operations=fast_operations())
    if fast:
        prepare_model(model, channels_last=True, compile=True)
    with torch.no_grad():
        bank = model.reference_bank(cases["reference_latent"][:1], 500, cases["context"])
        eps_c = model.eps_cond(cases["x_noisy"], cases["timesteps"], cases["context"], bank, cases["global_hint"],
                               cases["local_hint"])
        eps_u = model.eps_uncond(cases["x_noisy"], cases["timesteps"], cases["uncond_context"])
        decoded = model.decode_latents(cases["vae_latent"])
        sampled = {}
        for case in ("sample16", "sample20_overlap4"):
            denoise = with_cuda_graphs(GuidedDenoiser.for_model(
                model, cases[f"{case}_reference_latent"], global_hint=cases[f"{case}_global_hint"],
                local_hint=cases[f"{case}_local_hint"], guidance_scale=5.0, context=cases[f"{case}_context"],
                uncond_context=cases[f"{case}_uncond_context"]))
            sampled[case] = sample_ddim(denoise, cases[f"{case}_x_T"], model.alphas_cumprod, ddim_timesteps(4),
                                        window=16, overlap=4 if "overlap" in case else 0,
                                        window_offsets=cases[f"{case}_window_offsets"])

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    def mx(a, b):
        return float((a.float() - b).abs().max())

    emit(kind="golden", dtype=str(dtype), fast=fast, attention=attention.resolve_backend(torch.device(device), dtype),
         eps_cond_max=mx(eps_c, cases["eps_cond"]), eps_cond_rel=rel(eps_c, cases["eps_cond"]),
         eps_uncond_max=mx(eps_u, cases["eps_uncond"]), eps_uncond_rel=rel(eps_u, cases["eps_uncond"]),
         vae_decoded_max=mx(decoded, cases["vae_decoded"]),
         sample16_max=mx(sampled["sample16"], cases["sample16_out"]),
         sample16_rel=rel(sampled["sample16"], cases["sample16_out"]),
         sample20_max=mx(sampled["sample20_overlap4"], cases["sample20_overlap4_out"]),
         sample20_rel=rel(sampled["sample20_overlap4"], cases["sample20_overlap4_out"]))


def set_inductor_options(settings: list[str]) -> None:
    """Apply `KEY=VALUE` Inductor settings (Python literals), refusing unknown keys rather than ignoring them."""
    import ast

    if not settings:
        return
    import torch._inductor.config as inductor_config

    for setting in settings:
        key, _, value = setting.partition("=")
        node = inductor_config
        *parents, leaf = key.split(".")
        for part in parents:
            node = getattr(node, part)
        if not hasattr(node, leaf):
            raise SystemExit(f"--inductor: torch._inductor.config has no setting {key!r}")
        setattr(node, leaf, ast.literal_eval(value))
        emit(kind="inductor", setting=key, value=getattr(node, leaf))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=PRECISIONS, nargs="*", default=["bf16"])
    parser.add_argument("--frames", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--final-frames", type=int, nargs="*", default=[],
                        help="frame counts measured only after the last variant")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--networks", action="store_true", help="time one call of each network")
    parser.add_argument("--attention", default="auto", choices=attention.BACKENDS)
    parser.add_argument("--check-golden", type=Path, default=None, metavar="DIR")
    parser.add_argument("--golden-fast", action="store_true", help="check golden with channels-last + compile")
    parser.add_argument("--golden-dtypes", choices=PRECISIONS, nargs="+", default=["fp32", "bf16", "fp16"])
    parser.add_argument("--json", type=Path, default=None, help="also write all records to this file")
    parser.add_argument("--variants", nargs="+", default=["eager"],
                        choices=["eager", "channels_last", "compile", "compile_whole", "low_vram"],
                        help="cumulative speed-ups, each measured after the previous ones are applied")
    parser.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"])
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings to try, e.g. coordinate_descent_tuning=True")
    parser.add_argument("--decode-chunk", type=int, default=16, help="frames per VAE decode batch")
    parser.add_argument("--profile", action="store_true",
                        help="print the top CUDA kernels of one window's calls and of one VAE decode chunk")
    parser.add_argument("--profile-sources", action="store_true",
                        help="with --profile: also the window call's kernel time by op and the pack's function "
                             "that ran it (needs --cuda-graphs 0 on a GPU: a replayed graph has no Python stack)")
    parser.add_argument("--breakdown", action="store_true", help="GPU time of one window call by block kind")
    parser.add_argument("--phases", action="store_true",
                        help="after the timed runs, one more job timed phase by phase (set-up, window calls, decode)")
    parser.add_argument("--batched-banks", action="store_true",
                        help="with --phases: every timestep's reference bank from one batched call (not low-VRAM)")
    parser.add_argument("--frame-kernel", type=int, default=1, help="0: temporal attention through SDPA too")
    parser.add_argument("--cuda-graphs", type=int, default=1, help="0: every window eagerly (no CUDA graphs)")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="expandable",
                        help="CUDA allocator: expandable (the CLI's default), native, or async (cudaMallocAsync, "
                             "ComfyUI's default; CUDA graphs are off there). An existing PYTORCH_CUDA_ALLOC_CONF wins")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu with --config tiny for a smoke test")
    parser.add_argument("--config", choices=["official", "tiny"], default="official")
    args = parser.parse_args(argv)
    if args.profile_sources and not args.profile:
        raise SystemExit("--profile-sources goes with --profile")
    if args.profile_sources and args.device == "cuda" and args.cuda_graphs:
        raise SystemExit("--profile-sources needs --cuda-graphs 0: a replayed CUDA graph has no Python stack")
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATORS[args.allocator]
        if args.allocator == "async":
            # The allocator backend is fixed when torch loads (already done here): start again with it set.
            os.execv(sys.executable, [sys.executable] + sys.argv)
        # Other settings are read at the first CUDA allocation, still to come.
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (or --device cpu --config tiny for a smoke test)")
    config = XPortraitConfig.official() if args.config == "official" else XPortraitConfig.tiny()
    attention.set_attention_backend(args.attention)
    frame_attention.set_frame_kernel(bool(args.frame_kernel))
    os.environ["XPORTRAIT_CUDA_GRAPHS"] = str(args.cuda_graphs)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    set_inductor_options(args.inductor)

    if args.check_golden:
        for name in args.golden_dtypes:
            check_golden(args.check_golden, dtype_named(name), fast=args.golden_fast)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    for name in args.dtype:
        dtype = dtype_named(name)
        model = build_random_model(config, dtype, args.device)
        applied = []
        for step in args.variants:
            apply_variant(model, step, args)
            applied.append(step)
            label = "+".join(applied) + f"-{name}"
            if args.profile:
                profile_window(model, args.resolution, sources=args.profile_sources)
                profile_decode(model, args.resolution, args.decode_chunk)
            if args.breakdown:
                breakdown_window(model, args.resolution)
            if args.networks:
                bench_networks(model, args.resolution)
            frame_counts = list(args.frames) + (list(args.final_frames) if step == args.variants[-1] else [])
            for frames in frame_counts:
                bench_video(model, frames, args.resolution, args.runs, args.overlap, label=label,
                            decode_chunk=args.decode_chunk, phases=args.phases, batched_banks=args.batched_banks)
        del model
        torch.cuda.empty_cache()

    if args.json:
        args.json.write_text("\n".join(json.dumps(r) for r in RESULTS) + "\n")
    print("\n| what | frames | dtype | seconds | s/frame | peak GiB (allocated / reserved) | TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for r in RESULTS:
        if r["kind"] == "video":
            print(f"| video {r['variant']} | {r['frames']} | {r['dtype']} | {r['seconds']} | {r['seconds_per_frame']} | "
                  f"{r['peak_vram_gib']} / {r['peak_reserved_gib']} | {r['achieved_tflops']} |")
        elif r["kind"] == "network":
            print(f"| {r['name']} | {r['frames']} | {r['dtype']} | {r['seconds']} | | | |")


if __name__ == "__main__":
    main()
