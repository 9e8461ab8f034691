"""Checks of fp8 weight storage inside ComfyUI, run by test_comfyui_fp8.py in a subprocess with ComfyUI's Python:
prints one JSON line of measurements, which the tests assert on. Usage: python comfy_fp8_checks.py COMFYUI_PATH
WORKDIR GOLDEN_WEIGHTS (the arguments of comfy_native_checks.py, whose set-up and stand-ins it reuses).

On the CPU, with the tiny golden weights: X-Portrait Load Model with dtype fp8_e4m3fn against fp32.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Imports ComfyUI (on the CPU) and the pack, and registers the model folders: the same set-up as the native checks.
import comfy_native_checks as native  # noqa: E402

import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
from comfy.cli_args import args  # noqa: E402

run_node, stand_ins, comfy_nodes = native.run_node, native.stand_ins, native.comfy_nodes
NETWORKS = ("unet", "reference_net", "global_control", "local_control")


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def storage_report(handle, model) -> dict:
    """Where fp8 is held: dtypes of the Linear/Conv2d weights and the other parameters, per network."""
    xportrait = handle.model
    linear_conv, other = {}, {}
    for name in NETWORKS + ("vae",):
        for module in getattr(xportrait, name).modules():
            for p in module.parameters(recurse=False):
                kind = linear_conv if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) else other
                kind.setdefault(name, set()).add(str(p.dtype).replace("torch.", ""))
    return {
        "linear_conv": {k: sorted(v) for k, v in linear_conv.items()},
        "other": {k: sorted(v) for k, v in other.items()},
        "dtype": str(xportrait.dtype), "storage_dtype": str(xportrait.storage_dtype),
        "get_dtype": str(model.model.get_dtype()), "manual_cast_dtype": str(model.model.manual_cast_dtype),
        "casts_weights": xportrait.operations.casts_weights,
        "layer_class": type(xportrait.unet.time_embed[0]).__module__ + "." + type(xportrait.unet.time_embed[0]).__qualname__,
        "weight_bytes": sum(p.numel() * p.element_size() for p in xportrait.parameters()),
        "unet_manual_cast_on_cpu": str(mm.unet_manual_cast(torch.float8_e4m3fn, mm.get_torch_device())),
    }


def ksampler(handle, model, seed: int = 3) -> torch.Tensor:
    reference, motion, context, uncond_context = stand_ins(6, seed)
    positive, negative, latent = run_node("XPortraitConditioning", xportrait_model=handle,
                                          positive=[[context, {}]], negative=[[uncond_context, {}]],
                                          reference=reference, motion=motion, seed=1, window_overlap=4)
    return comfy_nodes.common_ksampler(model, 5, 3, 5.0, "ddim", "ddim_uniform", positive, negative,
                                       latent)[0]["samples"]


def our_sampler(handle, seed: int = 4):
    reference, motion, context, uncond_context = stand_ins(6, seed)
    frames, latent = run_node("XPortraitSampler", xportrait_model=handle, reference=reference, motion=motion,
                              seed=7, steps=3, guidance=5.0, window_overlap=4, initial_latents="noised reference",
                              positive=[[context, {}]], negative=[[uncond_context, {}]])
    return frames, latent["samples"]


def compare(fp8, fp32) -> dict:
    return {"finite": bool(torch.isfinite(fp8).all()), "relative_rms": relative_rms(fp8, fp32),
            "max_abs": float(fp32.abs().max()), "shape": list(fp8.shape)}


def lora_check(model) -> dict:
    """LoraLoaderModelOnly on the fp8 model: ComfyUI upcasts each named weight, adds the LoRA and rounds it back
    to fp8 (stochastically); unloading restores the plain weights."""
    unet = model.model.diffusion_model
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    expected = native.write_lora(native.loras / "fp8_kohya.safetensors", original, "kohya")
    strength = 0.7
    patched = run_node("LoraLoaderModelOnly", model=model, lora_name="fp8_kohya.safetensors",
                       strength_model=strength)[0]
    mm.load_models_gpu([patched])
    now = unet.state_dict()
    changed = sorted(k for k in original if not torch.equal(now[k], original[k]))
    # Each patched weight is fp8 again and within one fp8 step of the exact sum (stochastic rounding picks one of
    # the two neighbours); the change correlates with the LoRA's delta.
    worst_step, agreement = 0.0, []
    for key, delta in expected.items():
        exact = original[key].float() + strength * delta
        got = now[key].float()
        # An e4m3fn step at a value is at most an eighth of it (3 mantissa bits); 2^-9 is the subnormal step.
        step = torch.maximum(exact.abs(), got.abs()) / 8 + 2.0 ** -9
        worst_step = max(worst_step, float(((got - exact).abs() / step).max()))
        change = (got - original[key].float()).flatten()
        agreement.append(float(torch.nn.functional.cosine_similarity(change, strength * delta.flatten(), dim=0)))
    dtypes = sorted({str(now[k].dtype) for k in expected})
    mm.load_models_gpu([model])
    plain = unet.state_dict()
    return {"changed": changed, "expected": sorted(expected), "dtypes": dtypes, "worst_in_steps": worst_step,
            "min_cosine": min(agreement),
            "restored": all(torch.equal(plain[k], original[k]) for k in original)}


def auto_with_flag() -> dict:
    """dtype auto under --fp8_e4m3fn-unet / --fp8_e5m2-unet stores fp8, as ComfyUI's own UNet loading does."""
    picked = {}
    for flag in ("fp8_e4m3fn_unet", "fp8_e5m2_unet"):
        setattr(args, flag, True)
        try:
            handle = run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype="auto",
                              attention="auto")[0]
            picked[flag] = [str(handle.model.storage_dtype), str(handle.model.dtype)]
        finally:
            setattr(args, flag, False)
    handle = run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype="auto", attention="auto")[0]
    picked["none"] = [str(handle.model.storage_dtype), str(handle.model.dtype)]
    return picked


def main():
    plain_handle, plain_model, _clip, _vae = run_node("XPortraitLoadModel", model_name="tiny.safetensors",
                                                      dtype="fp32", attention="auto")
    handle, model, _clip, _vae = run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype="fp8_e4m3fn",
                                          attention="auto")
    report = {"storage": storage_report(handle, model), "plain_storage": storage_report(plain_handle, plain_model),
              "repr": repr(handle)}
    report["ksampler"] = compare(ksampler(handle, model), ksampler(plain_handle, plain_model))
    fp8_frames, fp8_latent = our_sampler(handle)
    frames, latent = our_sampler(plain_handle)
    report["sampler"] = {"latent": compare(fp8_latent, latent), "frames": compare(fp8_frames, frames)}
    report["lora"] = lora_check(model)
    report["auto"] = auto_with_flag()
    # benchmarks/bench_comfy.py builds the fp8 model as the Load node does, and reports its weight bytes.
    sys.path.insert(0, str(native.ROOT / "benchmarks"))
    import bench_comfy

    report["bench"] = bench_comfy.main(["--comfyui", native.COMFYUI_PATH, "--device", "cpu", "--config", "tiny",
                                        "--dtype", "fp8_e4m3fn", "--frames", "4", "--steps", "2", "--runs", "1",
                                        "--measure", "ksampler"])
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
