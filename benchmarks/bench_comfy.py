#!/usr/bin/env python3
"""Speed and memory of X-Portrait sampled by ComfyUI's KSampler (the native-model adapter), beside our Sampler in
the same process: what a ComfyUI user gets.

Runs inside ComfyUI's Python with its source at COMFYUI_PATH (imported in-process, no server). The full-size
`official()` model is built with random weights unless --checkpoint is given (speed does not depend on the weight
values); 16 frames at 512 with random reference, hints and text contexts. Measured per run, median of --runs after
one warm-up:

  sampler      our X-Portrait Sampler's path (animate_latents: official 30-step DDIM, guidance 5), no decode
  ksampler     KSampler ddim + ddim_uniform, 30 steps, cfg 5 through X-Portrait Conditioning and the MODEL output
  lcm          KSampler lcm + sgm_uniform, 6 steps, cfg 1 (one branch) + VAE Decode (the LCM-LoRA path; a LoRA
               does not change the cost: --lora FILE applies one through LoraLoaderModelOnly all the same)
  decode       VAE Decode of the frames by the loader's VAE

ComfyUI's default allocator (cudaMallocAsync, as its main.py sets) unless --allocator says otherwise; ComfyUI's
own flags go through --comfy-args, e.g. --comfy-args="--lowvram" (partial loading needs the networks built from
comfy.ops layer classes; see README). --dtype takes X-Portrait Load Model's dtype choices and builds the model as
that node does for it (fp8_e4m3fn / fp8_e5m2: fp8 weights in the diffusion networks, compute in what ComfyUI casts
them to; auto: ComfyUI's pick, its --fp8_e4m3fn-unet flag included). Prints one JSON object per measurement, with
the peak allocated and reserved GPU memory and the model's weight bytes (model_gib; model_gib_compute_dtype: the
same weights all in the compute dtype), from which the VRAM a user needs is stated, and KSampler's kept-graphs
counters (kept_graphs_served_again, kept_graphs_recordings: over the process so far), which show whether runs
replayed graphs an earlier run recorded.

    COMFYUI_PATH=~/ComfyUI python benchmarks/bench_comfy.py --runs 3
    COMFYUI_PATH=... python benchmarks/bench_comfy.py --device cpu --config tiny --frames 4 --steps 2 --runs 1
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOCATORS = {"async": "backend:cudaMallocAsync", "native": "", "expandable": "expandable_segments:True"}


def dtype_choices() -> tuple[str, ...]:
    """X-Portrait Load Model's dtype choices (the names module imports no torch)."""
    spec = importlib.util.spec_from_file_location("_xportrait_dtypes", ROOT / "xportrait_core" / "model" / "dtypes.py")
    names = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(names)
    return ("auto", *names.PRECISIONS, *names.STORAGE_PRECISIONS)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI source folder")
    parser.add_argument("--comfy-args", default="", help="ComfyUI command-line flags, e.g. '--lowvram'")
    parser.add_argument("--checkpoint", type=Path, default=None, help="X-Portrait weights (default: random)")
    parser.add_argument("--config", choices=["official", "tiny"], default="official")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (with --config tiny) for a smoke test")
    parser.add_argument("--dtype", choices=dtype_choices(), default="bf16",
                        help="X-Portrait Load Model's dtype choice (fp8_e4m3fn / fp8_e5m2: fp8 weight storage)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=None, help="default: 512, or 64 with --config tiny")
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps of sampler and ksampler")
    parser.add_argument("--lcm-steps", type=int, default=6)
    parser.add_argument("--lora", type=Path, default=None, help="an SD1.5 LoRA file for the lcm run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--measure", nargs="+", default=["sampler", "ksampler", "lcm", "decode"],
                        choices=["sampler", "ksampler", "lcm", "decode"])
    parser.add_argument("--allocator", choices=ALLOCATORS, default="async")
    parser.add_argument("--json", type=Path, default=None, help="also write the records to this file")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="after the timed runs, one more run of each measurement under torch.profiler: "
                             "DIR/profile_<measure>.txt holds its ops by device time and by host time, and the "
                             "record gains the run's wall time and the device's busy time")
    parser.add_argument("--ab", nargs="+", default=[], type=variant_name,
                        metavar="VARIANT",
                        help="alternate each run with one of this variant (B), A B A B in this process: banks = "
                             "reference banks a timestep at a time (the tree before batched banks); group_norm = "
                             "the GroupNorm kernel off (ComfyUI's GroupNorm alone); whole_feed_forward = "
                             "feed-forwards unsliced; flash_attention = PyTorch's flash / memory-efficient SDPA "
                             "instead of cuDNN's; graphs_off = no CUDA graphs; graphs_short_runs = graphs recorded for "
                             "every run of any length; keep_graphs_off = KSampler's graphs recorded afresh every "
                             "run (the graph variants leave the A runs' kept graphs alone); identical = B is A "
                             "(the arms' bias); layer_norm = the LayerNorm kernel off (ComfyUI's LayerNorm alone); "
                             "norm_fusions = the norms' fused forms off (timestep embedding, SiLU, frame encoding "
                             "as operations of their own); sampler_eager_under_async = our Sampler without graphs "
                             "under ComfyUI's allocator; recorded_reference_net = graphs record the reference net "
                             "per step instead of copying batched banks; conv_bias = convolutions' biases added by "
                             "PyTorch; comfy_vae = VAE Decode through ComfyUI's own autoencoder; carry_off = KSampler's "
                             "runs compute banks and hint features afresh instead of taking the last run's; "
                             "vae_compiled = with --compile, VAE Decode through the pack's network with its blocks "
                             "compiled; several joined by + apply together (graphs_off+group_norm)")
    parser.add_argument("--profile-trace", action="store_true",
                        help="with --profile: also write the profiled run's timeline, DIR/trace_<measure>.json "
                             "(chrome://tracing, Perfetto) with Python stacks: where the device waits for the host")
    parser.add_argument("--profile-sources", action="store_true",
                        help="with --profile: record shapes and Python stacks in the profiled run, and add a table of "
                             "the kernels named by --profile-sources-kernel by the operator, shapes and pack source "
                             "line that launched them (eager runs only: a replayed graph's kernels have no operator)")
    parser.add_argument("--profile-sources-kernel", default="native::elementwise_kernel<",
                        help="the kernel-name fragment --profile-sources attributes (default: PyTorch's "
                             "unvectorised elementwise kernel)")
    parser.add_argument("--compile", action="store_true",
                        help="X-Portrait Load Model's compile option (the first run compiles: minutes)")
    args = parser.parse_args(argv)
    if not args.comfyui or not Path(args.comfyui, "comfy").is_dir():
        parser.error("give ComfyUI's source folder with --comfyui or COMFYUI_PATH")
    if args.resolution is None:
        args.resolution = 64 if args.config == "tiny" else 512
    return args


def import_comfyui(args):
    """ComfyUI's modules in-process, configured as its main.py would be with these flags."""
    if args.device == "cuda":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATORS[args.allocator])
    # ComfyUI's own `nodes` module must win over the pack's `nodes` folder.
    sys.path[:0] = [str(Path(args.comfyui).resolve()), str(ROOT)]
    import comfy.options

    comfy.options.enable_args_parsing()
    saved, sys.argv = sys.argv, ["main.py", *shlex.split(args.comfy_args)] + (["--cpu"] if args.device == "cpu" else [])
    try:
        import comfy.cli_args  # noqa: F401  (parses the flags above)
    finally:
        sys.argv = saved
    import comfy.model_management  # noqa: F401
    import nodes  # noqa: F401


def load_pack():
    name = "comfyui_xportrait"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@contextlib.contextmanager
def per_step_banks():
    """The reference banks of one timestep per call, as before `sampling/batched_banks.py` was the default."""
    from xportrait_core.sampling import pipeline, video_denoiser

    saved = pipeline.BatchedReferenceBanks, video_denoiser.BatchedReferenceBanks
    pipeline.BatchedReferenceBanks = video_denoiser.BatchedReferenceBanks = lambda banks, timesteps, **_: banks
    try:
        yield
    finally:
        pipeline.BatchedReferenceBanks, video_denoiser.BatchedReferenceBanks = saved


def kernel_switched_off(module: str, setter: str, doc: str):
    """A variant that runs B with one of the pack's kernels switched off (as its environment variable at 0 gives),
    and puts the switch back as it found it, also after a B run that failed."""

    @contextlib.contextmanager
    def variant():
        kernels = importlib.import_module(f"xportrait_core.fast.{module}")
        saved = kernels._enabled
        getattr(kernels, setter)(False)
        try:
            yield
        finally:
            getattr(kernels, setter)(saved)

    variant.__doc__ = doc
    return variant


group_norm_kernel_off = kernel_switched_off(
    "group_norm", "set_group_norm_kernel", "ComfyUI's (or PyTorch's) GroupNorm alone (XPORTRAIT_GROUP_NORM_KERNEL=0).")


@contextlib.contextmanager
def whole_feed_forward():
    """Feed-forwards over the whole batch at once (no slices under 256 MiB of projection): fewer, larger calls and
    no copy of each slice's output, for a higher memory peak."""
    from xportrait_core.model.blocks import FeedForward

    saved = FeedForward.chunk_bytes
    FeedForward.chunk_bytes = 2**40
    try:
        yield
    finally:
        FeedForward.chunk_bytes = saved


@contextlib.contextmanager
def flash_attention_only():
    """PyTorch's own flash and memory-efficient SDPA kernels instead of cuDNN's (which SDPA picks first on
    Hopper): less host work per call, perhaps slower kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


@contextlib.contextmanager
def kept_graphs_untouched():
    """KSampler's denoisers get no kept graphs (fast/kept_graphs.py), so a B run neither replays, replaces nor
    releases the graphs the A runs keep, nor changes which run they remember: A B A B then measures a kept A run
    against the B arm. (Not itself a variant: the graph variants below apply it.)"""
    from xportrait_core.sampling.video_denoiser import VideoDenoiser

    init = VideoDenoiser.__init__

    def init_without_kept_graphs(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "kept_graphs": None})

    VideoDenoiser.__init__ = init_without_kept_graphs
    sampler_kept = SAMPLER_KEPT_GRAPHS["on"]
    SAMPLER_KEPT_GRAPHS["on"] = False  # our Sampler's runs likewise (the `sampler` measure reads this)
    try:
        yield
    finally:
        VideoDenoiser.__init__ = init
        SAMPLER_KEPT_GRAPHS["on"] = sampler_kept


# Whether the `sampler` measure passes the handle's KeptSamplerGraphs (off inside the graph variants' B runs).
SAMPLER_KEPT_GRAPHS = {"on": True}


@contextlib.contextmanager
def cuda_graphs_off():
    """Every window runs eagerly, our Sampler's and KSampler's, as XPORTRAIT_CUDA_GRAPHS=0 gives (graphs record
    under ComfyUI's allocator where the pack's Triton kernels launch by address: fast/triton_launch.py). KSampler's
    kept graphs would be released by a run where graphs do not apply; here its denoisers do not reach them
    (`kept_graphs_untouched`), so the A runs keep theirs."""
    saved = os.environ.get("XPORTRAIT_CUDA_GRAPHS")
    os.environ["XPORTRAIT_CUDA_GRAPHS"] = "0"
    try:
        with kept_graphs_untouched():
            yield
    finally:
        if saved is None:
            del os.environ["XPORTRAIT_CUDA_GRAPHS"]
        else:
            os.environ["XPORTRAIT_CUDA_GRAPHS"] = saved


@contextlib.contextmanager
def kept_graphs_off():
    """KSampler's window graphs recorded for each run (one that repays them: cuda_graphs.repays_recording) and
    released at its end, as before fast/kept_graphs.py, while the graphs the A runs keep stay kept."""
    with kept_graphs_untouched():
        yield


@contextlib.contextmanager
def graphs_for_short_runs():
    """CUDA graphs recorded for every run of any length (cuda_graphs.MIN_GRAPHED_STEPS at 0: the LCM path's 6
    steps too), each run its own, the A runs' kept graphs untouched. (For KSampler runs of 20+ steps this is
    keep_graphs_off.)"""
    from xportrait_core.fast import cuda_graphs

    saved = cuda_graphs.MIN_GRAPHED_STEPS
    cuda_graphs.MIN_GRAPHED_STEPS = 0
    try:
        with kept_graphs_untouched():
            yield
    finally:
        cuda_graphs.MIN_GRAPHED_STEPS = saved


layer_norm_kernel_off = kernel_switched_off(
    "layer_norm", "set_layer_norm_kernel", "ComfyUI's (or PyTorch's) LayerNorm alone (XPORTRAIT_LAYER_NORM_KERNEL=0).")


@contextlib.contextmanager
def norm_fusions_off():
    """The norms' fused forms off (the tree before them): a ResBlock adds its timestep embedding and applies SiLU
    as operations of their own, a motion block adds its frame encoding after the LayerNorm."""
    import torch

    from xportrait_core.model import blocks, temporal

    def norm_silu(norm, x, shift=None):
        if shift is not None:
            x = x + shift[:, :, None, None]
        return torch.nn.functional.silu(norm(x))

    def norm_plus(norm, x, addend):
        return norm(x) + addend

    saved = blocks.norm_silu, temporal.norm_plus
    blocks.norm_silu, temporal.norm_plus = norm_silu, norm_plus
    try:
        yield
    finally:
        blocks.norm_silu, temporal.norm_plus = saved


@contextlib.contextmanager
def sampler_eager_under_async():
    """Our Sampler without graphs under ComfyUI's allocator (its rule before batched banks went into graphs)."""
    from xportrait_core.sampling import pipeline

    saved = pipeline.sampler_graph_rules
    pipeline.sampler_graph_rules = lambda steps: dict(saved(steps), cuda_malloc_async=False)
    try:
        with kept_graphs_untouched():
            yield
    finally:
        pipeline.sampler_graph_rules = saved


@contextlib.contextmanager
def recorded_reference_net():
    """Graphs record the reference net at batch 1 per timestep instead of copying each step's bank from the batched
    banks (the graphed paths before that)."""
    from xportrait_core.sampling.batched_banks import BatchedReferenceBanks

    saved = BatchedReferenceBanks.stored
    BatchedReferenceBanks.stored = None
    try:
        with kept_graphs_untouched():
            yield
    finally:
        BatchedReferenceBanks.stored = saved


conv_bias_kernel_off = kernel_switched_off(
    "conv_bias", "set_conv_bias_kernel",
    "Convolutions add their biases through PyTorch, the unvectorised broadcast sum (XPORTRAIT_CONV_BIAS_KERNEL=0).")


# The adapter (XPortraitComfyModel) whose state across runs some B arms keep apart from A's; set by main.
BENCH_ADAPTER = {"model": None, "b_state": {}}


@contextlib.contextmanager
def b_arm_state(name: str):
    """The B arm keeps kept graphs and carried branches of its own across its runs, apart from A's: each arm is
    re-queued as a user's workflow would be, and neither arm's runs replace or release the other's state."""
    from xportrait_core.fast.kept_graphs import KeptWindowGraphs

    adapter = BENCH_ADAPTER["model"]
    own = BENCH_ADAPTER["b_state"].setdefault(name, {"kept": KeptWindowGraphs(), "carried": None})
    saved = adapter.kept_graphs, adapter._carried
    adapter.kept_graphs, adapter._carried = own["kept"], own["carried"]
    try:
        yield
    finally:
        own["kept"], own["carried"] = adapter.kept_graphs, adapter._carried
        adapter.kept_graphs, adapter._carried = saved


@contextlib.contextmanager
def carry_off():
    """KSampler's runs compute their reference banks and hint features every run instead of taking the last
    run's (sampling/carried_branches.py), with kept graphs of their own (`b_arm_state`)."""
    from xportrait_core.sampling.carried_branches import CarriedBranches

    fits = CarriedBranches.fits
    CarriedBranches.fits = lambda self, *args, **kwargs: False
    try:
        with b_arm_state("carry_off"):
            yield
    finally:
        CarriedBranches.fits = fits


# Variants whose B runs keep A's kept graphs untouched by their own means (or share them: identical).
OWN_STATE_VARIANTS = {"identical", "carry_off"}


# Whether the decodes use ComfyUI's own SD1.5 autoencoder instead of the pack's network (the comfy_vae variant),
# or the pack's network with its blocks compiled (vae_compiled).
COMFY_VAE_NETWORK = {"on": False, "compiled": False}


@contextlib.contextmanager
def vae_compiled():
    """VAE Decode through a VAE of the pack's network whose blocks are compiled (Load Model's VAE is not): what
    Load Model's `compile` would give if it compiled the VAE too. With --compile on CUDA only."""
    COMFY_VAE_NETWORK["compiled"] = True
    try:
        yield
    finally:
        COMFY_VAE_NETWORK["compiled"] = False


@contextlib.contextmanager
def comfy_vae_network():
    """VAE Decode with ComfyUI's own SD1.5 autoencoder (its layer order, NCHW) in place of the pack's network that
    the loader's VAE holds (channels-last, the pack's kernels)."""
    COMFY_VAE_NETWORK["on"] = True
    try:
        yield
    finally:
        COMFY_VAE_NETWORK["on"] = False


VARIANTS = {"banks": per_step_banks, "group_norm": group_norm_kernel_off, "whole_feed_forward": whole_feed_forward,
            "flash_attention": flash_attention_only, "graphs_off": cuda_graphs_off,
            "graphs_short_runs": graphs_for_short_runs, "layer_norm": layer_norm_kernel_off,
            "norm_fusions": norm_fusions_off, "keep_graphs_off": kept_graphs_off,
            # B = A: the two arms' difference when nothing differs (the first arm's bias, the noise).
            "identical": contextlib.nullcontext, "sampler_eager_under_async": sampler_eager_under_async,
            "recorded_reference_net": recorded_reference_net, "conv_bias": conv_bias_kernel_off,
            "comfy_vae": comfy_vae_network, "carry_off": carry_off, "vae_compiled": vae_compiled}


@contextlib.contextmanager
def apply_variant(name: str):
    """The named variant; several joined by "+" apply together (graphs_off+group_norm: both).

    Every variant but those of OWN_STATE_VARIANTS runs without the A runs' kept graphs (`kept_graphs_untouched`):
    those hold A's kernels and settings, which a B arm would otherwise replay, and a B run must not replace them.
    Such a B arm records its own graphs at every run, so read a kernel variant against the keep_graphs_off arm,
    which does the same with A's code. `identical` shares A's state; carry_off keeps kept graphs and carried
    branches of its own (`b_arm_state`), replayed from run to run as A's are."""
    with contextlib.ExitStack() as stack:
        if not set(name.split("+")) & OWN_STATE_VARIANTS:
            stack.enter_context(kept_graphs_untouched())
        for part in name.split("+"):
            stack.enter_context(VARIANTS[part]())
        yield


def variant_name(name: str) -> str:
    """argparse's check of an --ab value: known variants joined by "+"."""
    unknown = [part for part in name.split("+") if part not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown)}; choose from "
                                         f"{', '.join(VARIANTS)}, joined by + to combine them")
    return name


def kernel_sources(events, fragment: str, rows: int = 40) -> str:
    """The kernels whose name holds `fragment`, by what launched them: the innermost operator and its callers (up to
    three), the innermost's input shapes, and the first line of the pack (or, failing that, of ComfyUI) on the Python
    stack; sorted by device time. `events`: a profile's `events()` recorded with shapes and stacks."""
    totals: dict[tuple, list] = {}
    for event in events:
        kernels = [k for k in getattr(event, "kernels", []) if fragment in k.name]
        if not kernels:
            continue
        chain, parent = [event.name], event.cpu_parent
        while parent is not None and len(chain) < 4:
            chain.append(parent.name)
            parent = parent.cpu_parent
        stack = list(getattr(event, "stack", None) or [])
        site = next((frame for frame in stack if "xportrait_core" in frame or "/nodes/" in frame), None)
        site = site or next((frame for frame in stack if "comfy" in frame), "?")
        key = (" < ".join(chain), str(getattr(event, "input_shapes", ""))[:90], site)
        entry = totals.setdefault(key, [0, 0.0])
        entry[0] += len(kernels)
        entry[1] += sum(k.duration for k in kernels) / 1e3  # microseconds to milliseconds
    lines = [f"kernels named *{fragment}* by launching operator, shapes and source (launches, device ms):"]
    for (chain, shapes, site), (count, ms) in sorted(totals.items(), key=lambda item: -item[1][1])[:rows]:
        lines.append(f"{count:7d} {ms:9.2f} ms  {chain}  {shapes}  {site}")
    return "\n".join(lines) + "\n"


def initialise_like_torch(model) -> None:
    """PyTorch's default initialisation for every layer. ComfyUI's layer classes skip it (their weights always come
    from a file), which leaves a random-weight model with whatever memory held: NaN latents, and then a KSampler
    whose two branches no longer hold equal latents runs them as two UNet batches instead of one."""
    import torch.nn as nn

    for module in model.modules():
        for base in (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm):
            if isinstance(module, base):
                base.reset_parameters(module)
                break


def main(argv=None):
    args = parse(argv)
    import_comfyui(args)
    import torch

    import comfy.model_management as mm
    import nodes as comfy_nodes

    pack = load_pack()
    from comfyui_xportrait.nodes.loader import LoadedXPortrait, model_operations, model_precision
    from comfyui_xportrait.nodes.motion import XPortraitMotion
    from comfyui_xportrait.nodes.native import comfy_outputs
    from xportrait_core.fast.prepare import prepare_model
    from comfyui_xportrait.nodes.reference import XPortraitReference
    from xportrait_core.model.checkpoint import load_xportrait
    from xportrait_core.model.config import XPortraitConfig
    from xportrait_core.model.weight_storage import store_weights
    from xportrait_core.model.xportrait import XPortrait
    from xportrait_core.sampling.pipeline import animate_latents

    device = mm.get_torch_device()
    config = XPortraitConfig.official() if args.config == "official" else XPortraitConfig.tiny()
    # Built as X-Portrait Load Model builds it: the precision its dtype choice stands for, ComfyUI's layer classes
    # behind the pack's operations, then channels-last for a CUDA device (it runs there once ComfyUI loads it).
    dtype, storage_dtype = model_precision(args.dtype, device, "bench_comfy")
    operations = model_operations(dtype, storage_dtype, device)
    if args.checkpoint is not None:
        model = load_xportrait(args.checkpoint, dtype=dtype, device="cpu", operations=operations,
                               storage_dtype=storage_dtype)
    else:
        torch.manual_seed(0)
        model = XPortrait(config, with_text_encoder=False, operations=operations)
        initialise_like_torch(model)
        model = model.to(dtype).eval().requires_grad_(False)
        if storage_dtype is not None:
            store_weights(model, storage_dtype)
    prepare_model(model, channels_last=device.type == "cuda")
    tensors = list(model.parameters()) + list(model.buffers())
    model_gib = round(sum(t.numel() * t.element_size() for t in tensors) / 2**30, 4)
    model_gib_compute_dtype = round(sum(t.numel() * dtype.itemsize for t in tensors) / 2**30, 4)
    handle = LoadedXPortrait(model, "bench", "auto", compile=args.compile)
    comfy_model, _clip, vae = comfy_outputs(handle)
    other_vaes = {}

    def decoding_vae():
        """The loader's VAE (the pack's network), or in the comfy_vae variant's runs ComfyUI's own network, or in
        the vae_compiled variant's the pack's network compiled."""
        if not (COMFY_VAE_NETWORK["on"] or COMFY_VAE_NETWORK["compiled"]):
            return vae
        from comfyui_xportrait.nodes.native.comfy_types import comfy_vae

        key = "comfy" if COMFY_VAE_NETWORK["on"] else "compiled"
        if key not in other_vaes:
            other_vaes[key] = comfy_vae(model, pack_network=key != "comfy")
            if key == "compiled" and device.type == "cuda":
                from xportrait_core.fast.compilation import compile_blocks

                compile_blocks(other_vaes[key].first_stage_model)
        return other_vaes[key]
    handle.comfy_model = comfy_model
    BENCH_ADAPTER["model"] = comfy_model.model
    records = []

    def emit(**record):
        # KSampler's kept graphs (fast/kept_graphs.py), counted over the process so far (subtract the previous
        # record's): runs that replayed graphs an earlier run recorded, and the sets of graphs recorded.
        kept = getattr(comfy_model.model, "kept_graphs", None)
        record.update(kept_graphs_served_again=getattr(kept, "served_again", None),
                      kept_graphs_recordings=getattr(kept, "recordings", None),
                      sampler_kept_graphs_served_again=handle.kept_graphs.served_again,
                      sampler_kept_graphs_recordings=handle.kept_graphs.recordings)
        record.update(device=str(device), dtype=args.dtype, compiled=args.compile, compute_dtype=str(dtype).replace("torch.", ""),
                      storage_dtype=str(storage_dtype or dtype).replace("torch.", ""), model_gib=model_gib,
                      model_gib_compute_dtype=model_gib_compute_dtype, frames=args.frames,
                      resolution=args.resolution, comfy_args=args.comfy_args,
                      allocator=args.allocator if args.device == "cuda" else None)
        records.append(record)
        print(json.dumps(record), flush=True)

    res, frames = args.resolution, args.frames
    g = torch.Generator().manual_seed(999)
    image = torch.rand(res, res, 3, generator=g).numpy()
    global_hint = (torch.rand(frames, 3, res, res, generator=g) * 2 - 1).numpy()
    local_hint = (torch.rand(frames, 3, res, res, generator=g) * 2 - 1).numpy()
    context = torch.randn(1, 77, config.unet.context_dim, generator=g)
    reference = XPortraitReference([types.SimpleNamespace(image=image, resolution=res)])
    motion = XPortraitMotion(hints=types.SimpleNamespace(global_hint=global_hint, local_hint=local_hint,
                                                         num_frames=frames, resolution=res), local_hint=local_hint)
    node = pack.NODE_CLASS_MAPPINGS["XPortraitConditioning"]()
    positive, negative, latent = node.encode(handle, [[context, {}]], [[context, {}]], reference, motion, 999, 4)

    lcm_model = comfy_model
    if args.lora is not None:
        import comfy.sd
        import comfy.utils

        lcm_model, _ = comfy.sd.load_lora_for_models(comfy_model, None, comfy.utils.load_torch_file(str(args.lora)),
                                                     1.0, 0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def once(fn, times, peaks):
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            # (allocated, reserved): what the tensors took, and what the allocator held from the driver for them.
            peaks.append((torch.cuda.max_memory_allocated(device) / 2**30,
                          torch.cuda.max_memory_reserved(device) / 2**30))

    def profiled(name, fn) -> dict:
        """One more run under torch.profiler: where the device's time goes, and whether it waits on the host."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sync()
        sources = args.profile_sources
        with profile(activities=activities, record_shapes=sources,
                     with_stack=sources or args.profile_trace) as prof:
            start = time.perf_counter()
            fn()
            sync()
            wall = time.perf_counter() - start
        averages = prof.key_averages()
        device_key = "self_device_time_total"
        # The kernels' own time (operators' rows repeat their kernels' time, so only device-side rows count).
        from torch.autograd import DeviceType

        busy = sum(getattr(e, device_key, 0) for e in averages if e.device_type == DeviceType.CUDA) / 1e6
        args.profile.mkdir(parents=True, exist_ok=True)
        tables = [f"{name}: wall {wall:.3f} s, device busy {busy:.3f} s (kernels summed)\n"]
        if device.type == "cuda":
            tables.append(averages.table(sort_by=device_key, row_limit=40, max_name_column_width=110))
        tables.append(averages.table(sort_by="cpu_time_total", row_limit=30))
        if sources:
            tables.append(kernel_sources(prof.events(), args.profile_sources_kernel))
        (args.profile / f"profile_{name}.txt").write_text("\n".join(tables))
        if args.profile_trace:
            prof.export_chrome_trace(str(args.profile / f"trace_{name}.json"))
        return {"profiled_wall_s": round(wall, 4), "profiled_device_busy_s": round(busy, 4)}

    def timed(name, fn, **extra):
        fn()  # warm-up (and, for the ComfyUI runs, the model loading)
        for variant in args.ab:
            with apply_variant(variant):
                fn()
        times, peaks = [], []
        variant_times = {variant: ([], []) for variant in args.ab}
        for _ in range(args.runs):
            once(fn, times, peaks)
            for variant, (b_times, b_peaks) in variant_times.items():
                with apply_variant(variant):
                    once(fn, b_times, b_peaks)
        for variant, (b_times, b_peaks) in variant_times.items():
            extra[f"b_{variant}"] = dict(seconds=round(statistics.median(b_times), 4),
                                         runs=[round(t, 4) for t in b_times],
                                         peak_gib=round(max(p[0] for p in b_peaks), 2) if b_peaks else None,
                                         peak_reserved_gib=round(max(p[1] for p in b_peaks), 2) if b_peaks else None)
        if args.profile is not None:
            extra.update(profiled(name, fn))
        # Where ComfyUI left the weights after these runs: partial loading keeps some in system memory and casts
        # those layers onto the GPU as they run.
        extra["weights_on_device_gib"] = round(sum(p.numel() * p.element_size() for p in model.parameters()
                                                   if p.device.type == device.type) / 2**30, 3)
        extra["layers_cast_on_the_fly"] = sum(1 for m in model.modules() if getattr(m, "comfy_cast_weights", False))
        # Random weights still give finite latents (a NaN would change the path: see initialise_like_torch).
        result = outputs.pop(name, None)
        if result is not None:
            extra["finite"] = bool(torch.isfinite(result).all())
        emit(measure=name, seconds=round(statistics.median(times), 4), runs=[round(t, 4) for t in times],
             peak_gib=round(max(p[0] for p in peaks), 2) if peaks else None,
             peak_reserved_gib=round(max(p[1] for p in peaks), 2) if peaks else None, **extra)

    outputs = {}

    def ours():
        prepared = handle.ready()
        outputs["sampler"] = animate_latents(
            # The arrays themselves, as the Sampler node passes its MOTION's: the same objects at every run, so
            # their page-locked copies are kept (sampling/pinned_hints.py).
            prepared, image, global_hint=global_hint, local_hint=local_hint,
            steps=args.steps, guidance_scale=5.0, overlap=4, seed=999, context=context, uncond_context=context,
            kept_graphs=handle.kept_graphs if SAMPLER_KEPT_GRAPHS["on"] else None)

    def ksampler(name, model, steps, cfg, sampler, scheduler, decode=False):
        def run():
            samples = comfy_nodes.common_ksampler(model, 999, steps, cfg, sampler, scheduler, positive, negative,
                                                  latent, denoise=1.0)[0]
            outputs[name] = samples["samples"]
            if decode:
                comfy_nodes.VAEDecode().decode(decoding_vae(), samples)
        return run

    # ComfyUI executes every node of a prompt under torch.inference_mode (execution.py), VAE Decode included: the
    # measurements run so too (outside it a decode would record autograd's graph and skip the pack's kernels).
    with torch.inference_mode():
        if "sampler" in args.measure:
            timed("sampler", ours, steps=args.steps, guidance=5.0)
        if "ksampler" in args.measure:
            timed("ksampler", ksampler("ksampler", comfy_model, args.steps, 5.0, "ddim", "ddim_uniform"),
                  steps=args.steps, cfg=5.0, sampler="ddim", scheduler="ddim_uniform")
        if "lcm" in args.measure:
            timed("lcm", ksampler("lcm", lcm_model, args.lcm_steps, 1.0, "lcm", "sgm_uniform", decode=True),
                  steps=args.lcm_steps, cfg=1.0, sampler="lcm", scheduler="sgm_uniform", vae_decode=True,
                  lora=str(args.lora) if args.lora else None)
        if "decode" in args.measure:
            timed("decode", lambda: comfy_nodes.VAEDecode().decode(decoding_vae(), latent))
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
