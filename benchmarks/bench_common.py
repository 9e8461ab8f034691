"""What the GPU benchmark scripts share: records, timing, a random full-size model, the user's job on random inputs.

Nothing here imports `xportrait_core` at import time: `bench_job.py --compare-with DIR` runs this module against
another checkout's package, which `use_tree` puts first on the import path before anything of the pack loads.
The job uses only the pack's public entry points (`XPortrait`, `pipeline.animate_latents`, `decode_frames`,
`fast.compilation`, `fast.offload`), so that two commits can be timed by the same script.
"""
from __future__ import annotations

import ast
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# PYTORCH_CUDA_ALLOC_CONF of each allocator choice. expandable: what the command line sets; native: PyTorch's
# caching allocator as is (ComfyUI with --disable-cuda-malloc); async: cudaMallocAsync, ComfyUI's default, under
# which the pack runs without CUDA graphs.
ALLOCATORS = {"expandable": "expandable_segments:True", "native": "", "async": "backend:cudaMallocAsync"}


def use_tree(tree: Path | None = None) -> Path:
    """Import `xportrait_core` from `tree` (default: this checkout); returns the tree. Call before any pack import."""
    tree = Path(tree or ROOT).resolve()
    if not (tree / "xportrait_core" / "__init__.py").is_file():
        raise SystemExit(f"{tree} holds no xportrait_core package")
    sys.path.insert(0, str(tree))
    return tree


class Records:
    """Measurements as JSON objects: printed one a line as they come, and optionally written to a file at the end."""

    def __init__(self):
        self.items: list[dict] = []

    def emit(self, **record) -> dict:
        self.items.append(record)
        print(json.dumps(record), flush=True)
        return record

    def write(self, path: Path | None) -> None:
        if path is not None:
            path.write_text("".join(json.dumps(r) + "\n" for r in self.items))


def sync() -> None:
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


def keep_text(name: str, text: str) -> None:
    """Append text to $OUT/name, where the device machine brings files back from (nothing without $OUT)."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], name), "a") as f:
            f.write(text)


# ---- the pack's API across versions -----------------------------------------------------------------------
# bench_job.py times older checkouts beside this one, so the few calls below accept the API before and after the
# operations namespace (issue 17: kernels handed to the networks) and the guidance restructure.


def fast_operations():
    """The pack's CUDA kernels as the networks' operations, or None where the tree builds them into the model."""
    try:
        from xportrait_core.fast.operations import fast_operations as fast
    except ImportError:
        return None
    return fast()


def with_fast_operations(**kwargs) -> dict:
    operations = fast_operations()
    return kwargs if operations is None else {**kwargs, "operations": operations}


def build_random_model(config_name: str, dtype: torch.dtype, device: str):
    """The `official()` (or `tiny()`) model with seeded random weights, no CLIP, with the pack's kernels as a user's
    job gets them: speed does not depend on the weights' values."""
    from xportrait_core.model.config import XPortraitConfig
    from xportrait_core.model.xportrait import XPortrait

    config = XPortraitConfig.official() if config_name == "official" else XPortraitConfig.tiny()
    torch.manual_seed(0)
    with torch.device(device):
        model = XPortrait(config, **with_fast_operations(with_text_encoder=False))
    return model.to(dtype).eval().requires_grad_(False)


def speed_up(model, channels_last: bool, compile_mode: str, low_vram: bool):
    """The speed-ups a user's job gets: channels-last (what the command line and the Load node do on CUDA),
    torch.compile of the blocks ("regional", the `--compile` default) or of whole networks ("whole"), low-VRAM
    placement."""
    try:
        from xportrait_core.fast.prepare import prepare_model
    except ImportError:
        prepare_model = None
    if prepare_model is not None:
        return prepare_model(model, channels_last=channels_last, compile=compile_mode != "off",
                             regional=compile_mode != "whole", low_vram=low_vram)
    from xportrait_core.fast.compilation import compile_networks, use_channels_last
    from xportrait_core.fast.offload import place_for_low_vram

    if channels_last:
        use_channels_last(model)
    if compile_mode != "off":
        compile_networks(model, regional=compile_mode == "regional")
    if low_vram:
        place_for_low_vram(model, model.device)
    return model


def window_denoiser(model, reference_latents, **kwargs):
    """`denoise(x_window, t, frame_indices)` as the pipeline builds it: guidance over both branches, replayed through
    CUDA graphs where they apply. kwargs: global_hint, local_hint, guidance_scale, context, uncond_context."""
    from xportrait_core.sampling.guidance import GuidedDenoiser

    if hasattr(GuidedDenoiser, "for_model"):  # guidance as a formula, CUDA graphs as a wrapper
        from xportrait_core.fast.cuda_graphs import with_cuda_graphs

        return with_cuda_graphs(GuidedDenoiser.for_model(model, reference_latents, **kwargs))
    return GuidedDenoiser(model, reference_latents, **kwargs)


def release(denoiser) -> None:
    """Hand a denoiser's CUDA graph pools back (else they count in the next job's peak)."""
    getattr(denoiser, "release", lambda: None)()


def eps_both_branches(model):
    """The model's one-batch pass of both guidance branches: (conditional eps, unconditional eps)."""
    return getattr(model, "eps_branches", None) or model.eps_guided


def unet_bank_keyword(model) -> str:
    """The UNet's keyword for the reference bank it reads."""
    import inspect

    return "bank" if "bank" in inspect.signature(model.unet.forward).parameters else "reference"


class VideoJob:
    """Random inputs of one video, and the user's job on them: VAE-encode the reference, noise it to t=999 for every
    frame, DDIM in overlapping 16-frame windows with guidance, VAE-decode every frame to host memory."""

    def __init__(self, model, frames: int, resolution: int, seed: int = 999, decode_chunk: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.model, self.frames, self.seed, self.decode_chunk = model, frames, seed, decode_chunk
        self.reference = torch.rand(resolution, resolution, 3, generator=g).numpy()
        self.global_hint = torch.rand(frames, 3, resolution, resolution, generator=g) * 2 - 1
        self.local_hint = torch.rand(frames, 3, resolution, resolution, generator=g) * 2 - 1
        self.context = torch.randn(1, 77, model.config.unet.context_dim, generator=g)

    @torch.no_grad()
    def run(self, steps: int = 30, guidance: float = 5.0, overlap: int = 4, decode: bool = True, callback=None,
            after_sampling=None):
        """`pipeline.animate_latents` + `decode_frames`, as the command line runs them; returns the frames."""
        from xportrait_core.sampling.pipeline import animate_latents, decode_frames

        latents = animate_latents(self.model, self.reference, global_hint=self.global_hint,
                                  local_hint=self.local_hint, steps=steps, guidance_scale=guidance, overlap=overlap,
                                  seed=self.seed, context=self.context, uncond_context=self.context,
                                  callback=callback)
        if after_sampling is not None:
            after_sampling()
        if not decode:
            return latents
        return decode_frames(self.model, latents, chunk=self.decode_chunk)


def set_inductor_options(settings: list[str], records: Records | None = None) -> None:
    """Apply `KEY=VALUE` Inductor settings (Python literals), refusing unknown keys rather than ignoring them."""
    if not settings:
        return
    import torch._inductor.config as inductor_config

    for item in settings:
        key, _, value = item.partition("=")
        node = inductor_config
        *parents, leaf = key.split(".")
        for part in parents:
            node = getattr(node, part)
        if not hasattr(node, leaf):
            raise SystemExit(f"--inductor: torch._inductor.config has no setting {key!r}")
        setattr(node, leaf, ast.literal_eval(value))
        if records is not None:
            records.emit(kind="inductor", setting=key, value=getattr(node, leaf))


def fast_math() -> None:
    """TF32 and cuDNN autotuning, as a user's GPU run would have them."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def restart_with_allocator(name: str) -> None:
    """Set PYTORCH_CUDA_ALLOC_CONF for `name` unless the caller set it. The allocator backend is fixed when torch
    loads (already done here), so for cudaMallocAsync the process starts again with it set; the other settings are
    read at the first CUDA allocation, still to come."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATORS[name]
    if name == "async":
        os.execv(sys.executable, [sys.executable] + sys.argv)


def require_device(device: str, script: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU (or --device cpu --config tiny for a smoke test)")


def time_norm_variants(where: str, variants: dict, exact: torch.Tensor, moved: int) -> None:
    """Time each of `variants` {name: fn} with Triton's do_bench and print one JSON line per variant: its time, the
    bandwidth at `moved` bytes (one read and one write of the activation: the least any version moves) and its
    relative error against `exact`; a variant that fails prints its error instead."""
    from triton.testing import do_bench

    for name, fn in variants.items():
        try:
            out = fn()
            err = float((out.float() - exact).norm() / exact.norm())
            ms = do_bench(fn, warmup=25, rep=200)
        except Exception as exc:
            print(json.dumps({"where": where, "variant": name, "error": str(exc).splitlines()[0][:160]}),
                  flush=True)
            continue
        print(json.dumps({"where": where, "variant": name, "ms": round(ms, 4),
                          "GB/s at one read + one write": round(moved / ms / 1e6), "rel_err": round(err, 5)}),
              flush=True)
