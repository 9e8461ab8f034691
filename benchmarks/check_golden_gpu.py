#!/usr/bin/env python3
"""The fast paths against the official float32 golden fixtures, on a CUDA GPU.

Loads the tiny official-format weights of the fixtures in each dtype (with `--fast`, channels-last and compiled
blocks too) and compares with the recorded official outputs: one conditional and one unconditional noise
prediction, the VAE decode, and the two 4-step sampling runs through the production denoiser (`sample16`,
`sample20_overlap4`). Relative L2 errors and largest absolute differences, one JSON object per dtype. TF32 is off
so that float32 compares at float32's precision.

    python benchmarks/check_golden_gpu.py ../shared/golden
    python benchmarks/check_golden_gpu.py ../shared/golden --dtypes bf16 --fast
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402

common.use_tree()

from xportrait_core.model import attention  # noqa: E402
from xportrait_core.sampling.sampler import ddim_timesteps, sample_ddim  # noqa: E402

RECORDS = common.Records()
emit = RECORDS.emit


def check_golden(golden: Path, dtype: torch.dtype, fast: bool = False):
    """The fast path (CUDA, this dtype, this attention backend; with fast=True also channels-last and compiled
    blocks) against the official fp32 fixtures."""
    from safetensors.torch import load_file

    from xportrait_core.model.checkpoint import load_xportrait

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Full float32 matrix products here: TF32 would blur the float32 comparison by ~1e-3.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cases = {k: v.to(device) for k, v in load_file(str(golden / "tiny_cases.safetensors")).items()}
    model = load_xportrait(golden / "tiny_official_state_dict.safetensors",
                           **common.with_fast_operations(dtype=dtype, device=device))
    if fast:
        common.speed_up(model, channels_last=True, compile_mode="regional", low_vram=False)
    with torch.no_grad():
        bank = model.reference_bank(cases["reference_latent"][:1], 500, cases["context"])
        eps_c = model.eps_cond(cases["x_noisy"], cases["timesteps"], cases["context"], bank, cases["global_hint"],
                               cases["local_hint"])
        eps_u = model.eps_uncond(cases["x_noisy"], cases["timesteps"], cases["uncond_context"])
        decoded = model.decode_latents(cases["vae_latent"])
        sampled = {}
        for case in ("sample16", "sample20_overlap4"):
            denoise = common.window_denoiser(
                model, cases[f"{case}_reference_latent"], global_hint=cases[f"{case}_global_hint"],
                local_hint=cases[f"{case}_local_hint"], guidance_scale=5.0, context=cases[f"{case}_context"],
                uncond_context=cases[f"{case}_uncond_context"])
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("golden", type=Path, help="the golden fixtures' folder (../shared/golden)")
    parser.add_argument("--dtypes", choices=common.DTYPES, nargs="+", default=["fp32", "bf16", "fp16"])
    parser.add_argument("--fast", action="store_true", help="channels-last and compiled blocks as well")
    parser.add_argument("--json", type=Path, default=None, help="also write the records to this file")
    args = parser.parse_args(argv)
    if not (args.golden / "tiny_cases.safetensors").is_file():
        raise SystemExit(f"{args.golden} holds no tiny_cases.safetensors")
    for name in args.dtypes:
        check_golden(args.golden, common.DTYPES[name], fast=args.fast)
    RECORDS.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
