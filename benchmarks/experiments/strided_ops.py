#!/usr/bin/env python3
"""Which elementwise ops of one uncompiled guided window call run on strided, mismatched or broadcast operands?

On CUDA such ops leave PyTorch's vectorised elementwise kernels for its generic one (the profiler's
`elementwise_kernel<128, 4, gpu_kernel_impl_nocast<...>>`), and copies such as a transpose's `.reshape` are whole
extra passes over an activation. Found this way (2026-12-01): the batched guidance pass's self-attention output,
joined in the layout that needed a transposing copy (fixed in 5a14970).

Runs on the CPU, in float32, with the model's channels-last layout: the official block structure at a low
resolution (the ops are the same as at 512, only smaller) or the tiny config. The pack's CUDA kernels (GroupNorm,
GEGLU, frame attention) and SDPA are replaced by stand-ins that return outputs in the layouts the real kernels
write, so the layouts downstream are the GPU's. Values are not computed meaningfully (weights are left as
allocated); only layouts are read.

    python benchmarks/experiments/strided_ops.py --resolution 256          # official structure, about 2 minutes
    python benchmarks/experiments/strided_ops.py --config tiny --resolution 64 --json ops.json
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from xportrait_core.fast import frame_attention, geglu, group_norm  # noqa: E402
from xportrait_core.model import attention  # noqa: E402
from xportrait_core.fast.operations import fast_operations  # noqa: E402
from xportrait_core.fast.prepare import prepare_model  # noqa: E402
from xportrait_core.model.config import XPortraitConfig  # noqa: E402
from xportrait_core.sampling.guidance import GuidedDenoiser  # noqa: E402
from xportrait_core.model.xportrait import XPortrait  # noqa: E402

COPIES = (torch.ops.aten.copy_.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default)


def stand_in_cuda_kernels(device: torch.device, dtype: torch.dtype) -> None:
    """Route every call the GPU would send to a pack kernel or SDPA to an empty output of that kernel's layout."""
    group_norm.supports = lambda x: (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                                     and not x.is_contiguous())
    group_norm.group_norm_channels_last = lambda x, *a, **k: torch.empty_like(x, memory_format=torch.channels_last)
    geglu.supports = lambda p: p.is_contiguous() and not torch.is_grad_enabled()
    geglu.gated_gelu = lambda p: p.new_empty(p.shape[:-1] + (p.shape[-1] // 2,))
    frame_attention.supports = lambda q, k, v, causal: not causal and q.shape[2] <= frame_attention.MAX_TOKENS
    # The frame kernel and SDPA's CUDA kernels (cuDNN, flash) write (B, N, H, D) and return it as (B, H, N, D).
    def bnhd(q, k, v):
        return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[3]).transpose(1, 2)

    frame_attention.frame_attention = bnhd
    attention._run = lambda backend, q, k, v, causal: bnhd(q, k, v)
    frame_attention._works[(device.type, dtype)] = True
    attention._resolved[(device.type, dtype)] = "sdpa"


def layout(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


class StridedOps(TorchDispatchMode):
    """Counts pointwise ops and copies whose operands are broadcast, strided, or in layouts that differ, by the
    line of the pack that called them."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.elements: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (torch.Tag.pointwise in func.tags or func in COPIES) and isinstance(out, torch.Tensor) and out.numel() > 1:
            operands = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and a.numel() > 1]
            broadcast = any(a.shape != out.shape for a in operands)
            layouts = {layout(t) for t in operands + [out]}
            if broadcast or "strided" in layouts or len(layouts) > 1:
                frames = [f for f in traceback.extract_stack() if "xportrait_core" in f.filename]
                site = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}  {frames[-1].line}" if frames else "?"
                key = (str(func).replace("aten.", "") + (" (broadcast)" if broadcast else ""), site)
                self.calls[key] += 1
                self.elements[key] += out.numel()
        return out


def census(config: XPortraitConfig, resolution: int, frames: int = 16) -> list[dict]:
    device, dtype = torch.device("cpu"), torch.float32
    stand_in_cuda_kernels(device, dtype)
    with torch.device("meta"):
        model = XPortrait(config, with_text_encoder=False, operations=fast_operations())
    # Weights as allocated: layouts only.
    model = prepare_model(model.to_empty(device=device).eval(), channels_last=True)
    context = torch.zeros(1, 77, config.unet.context_dim, dtype=dtype)
    hint = torch.zeros(frames, 3, resolution, resolution)
    latents = torch.zeros(frames, config.unet.in_channels, resolution // 8, resolution // 8)
    mode = StridedOps()
    with torch.no_grad():
        denoise = GuidedDenoiser.for_model(model, latents[:1], global_hint=hint, local_hint=hint, guidance_scale=5.0,
                                           context=context, uncond_context=context)
        with mode:
            denoise(latents, 500, torch.arange(frames))
    return [{"op": op, "site": site, "calls": n, "elements": mode.elements[(op, site)]}
            for (op, site), n in sorted(mode.calls.items(), key=lambda kv: -mode.elements[kv[0]])]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["official", "tiny"], default="official")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    config = XPortraitConfig.official() if args.config == "official" else XPortraitConfig.tiny()
    rows = census(config, args.resolution, args.frames)
    print(f"{sum(r['calls'] for r in rows)} strided, mismatched or broadcast elementwise ops in one guided window call "
          f"({args.config}, {args.resolution}x{args.resolution}, {args.frames} frames, both branches):")
    for r in rows:
        print(f"{r['calls']:5d} {r['elements'] / 1e6:9.1f} M elements  {r['op']:30s} {r['site']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
