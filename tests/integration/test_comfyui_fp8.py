"""fp8 weight storage inside a real ComfyUI (COMFYUI_PATH, ComfyUI 0.3.64), on the CPU with the tiny golden weights:
X-Portrait Load Model with dtype fp8_e4m3fn against fp32 (comfy_fp8_checks.py, run once in a subprocess with
ComfyUI's Python).

Locally these skip without COMFYUI_PATH; under CI (`CI` set) they fail without it.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from test_comfyui_native import run_checks

CHECKS = Path(__file__).with_name("comfy_fp8_checks.py")
STORED = ("unet", "reference_net", "global_control", "local_control")


@pytest.fixture(scope="module")
def checks(tmp_path_factory, golden_state_dict_path):
    return run_checks(CHECKS, tmp_path_factory.mktemp("comfy_fp8"), golden_state_dict_path)


def test_fp8_is_stored_in_the_diffusion_networks_only(checks):
    storage = checks["storage"]
    for network in STORED:
        assert storage["linear_conv"][network] == ["float8_e4m3fn"], network
        assert storage["other"][network] == ["float32"], network  # norms keep the compute dtype
    assert storage["linear_conv"]["vae"] == storage["other"]["vae"] == ["float32"]
    # On the CPU ComfyUI computes fp8 weights in float32; its manual-cast layers cast them at every call.
    assert storage["unet_manual_cast_on_cpu"] == "torch.float32"
    assert storage["dtype"] == "torch.float32" and storage["storage_dtype"] == "torch.float8_e4m3fn"
    assert storage["casts_weights"] and storage["layer_class"].startswith("comfy.ops.manual_cast.")
    assert "weights torch.float8_e4m3fn" in checks["repr"]
    # ComfyUI reads the weights' dtype and computes in manual_cast_dtype, as for its own fp8 UNets.
    assert storage["get_dtype"] == "torch.float8_e4m3fn" and storage["manual_cast_dtype"] == "torch.float32"
    plain = checks["plain_storage"]
    assert plain["get_dtype"] == "torch.float32" and plain["manual_cast_dtype"] == "None"
    # fp8 instead of float32 for nearly all of the diffusion networks' bytes (the fp32 VAE is unchanged).
    assert storage["weight_bytes"] < 0.4 * plain["weight_bytes"]


# Relative RMS difference of fp8_e4m3fn from fp32 after 3 DDIM steps (tiny golden weights, 6 frames at 64 px):
# measured 0.016 (KSampler) and 0.015 (our Sampler) for the latents, 0.007 for our Sampler's frames; bounded with
# room, and from below, so a run that silently kept float32 weights fails.
LATENT_BOUNDS = (0.003, 0.1)


def test_ksampler_on_the_fp8_model_stays_close_to_fp32(checks):
    result = checks["ksampler"]
    assert result["finite"] and result["shape"] == [6, 4, 8, 8]
    assert LATENT_BOUNDS[0] < result["relative_rms"] < LATENT_BOUNDS[1]


def test_our_sampler_on_the_fp8_model_stays_close_to_fp32(checks):
    latent, frames = checks["sampler"]["latent"], checks["sampler"]["frames"]
    assert latent["finite"] and frames["finite"] and frames["shape"] == [6, 64, 64, 3]
    assert LATENT_BOUNDS[0] < latent["relative_rms"] < LATENT_BOUNDS[1]
    assert LATENT_BOUNDS[0] / 2 < frames["relative_rms"] < LATENT_BOUNDS[1]


def test_a_lora_applies_to_the_fp8_unet(checks):
    lora = checks["lora"]
    assert lora["changed"] == lora["expected"]
    assert lora["dtypes"] == ["torch.float8_e4m3fn"]
    # Within one fp8 step of the exact sum (stochastic rounding), and changed along the LoRA's delta.
    assert lora["worst_in_steps"] <= 1.0
    assert lora["min_cosine"] > 0.5
    assert lora["restored"]


def test_auto_follows_comfyuis_fp8_unet_flags(checks):
    assert checks["auto"] == {"fp8_e4m3fn_unet": ["torch.float8_e4m3fn", "torch.float32"],
                              "fp8_e5m2_unet": ["torch.float8_e5m2", "torch.float32"],
                              "none": ["torch.float32", "torch.float32"]}


def test_bench_comfy_builds_the_fp8_model_and_reports_its_bytes(checks):
    (record,) = checks["bench"]
    assert record["measure"] == "ksampler" and record["dtype"] == "fp8_e4m3fn" and record["seconds"] > 0
    assert record["storage_dtype"] == "float8_e4m3fn" and record["compute_dtype"] == "float32"
    assert 0 < record["model_gib"] < 0.4 * record["model_gib_compute_dtype"]
    assert record["peak_reserved_gib"] is None  # measured on CUDA only
