"""Checks of the native ComfyUI model that need ComfyUI imported in-process, run by test_comfyui_native.py in a
subprocess with ComfyUI's Python (its torch may not be the test environment's): it prints one JSON line of
measurements, which the tests assert on. Usage: python comfy_native_checks.py COMFYUI_PATH WORKDIR GOLDEN_WEIGHTS.

On the CPU, with the tiny golden weights and random motion hints, reference image and text contexts.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import types
from pathlib import Path

COMFYUI_PATH, WORKDIR, GOLDEN_WEIGHTS = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
ROOT = Path(__file__).resolve().parents[2]
# ComfyUI's own top-level `nodes` module comes before the pack's `nodes` folder.
sys.path[:0] = [COMFYUI_PATH, str(ROOT / "tests"), str(ROOT)]

from comfy.cli_args import args  # noqa: E402

args.cpu = True
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
import comfy.model_management  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import folder_paths  # noqa: E402
import nodes as comfy_nodes  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pack_loader import load_pack  # noqa: E402

RESOLUTION = 64
CONTEXT_WIDTH = 32

pack = load_pack()
casts_weights_now = importlib.import_module(pack.__name__ + ".nodes.native.operations").casts_weights_now
NODES = pack.NODE_CLASS_MAPPINGS
models = WORKDIR / "xportrait"
loras = WORKDIR / "loras"
models.mkdir(parents=True, exist_ok=True)
loras.mkdir(parents=True, exist_ok=True)
if not (models / "tiny.safetensors").exists():
    os.symlink(GOLDEN_WEIGHTS, models / "tiny.safetensors")
folder_paths.add_model_folder_path("xportrait", str(models))
folder_paths.add_model_folder_path("loras", str(loras))


def run_node(name, **inputs):
    cls = NODES[name] if name in NODES else comfy_nodes.NODE_CLASS_MAPPINGS[name]
    result = getattr(cls(), cls.FUNCTION)(**inputs)
    return result["result"] if isinstance(result, dict) else result  # a node that also shows text


def stand_ins(num_frames: int, seed: int):
    """A reference and motion as the pack's nodes pass them (random image and hints: no face detection needed)."""
    from comfyui_xportrait.nodes.motion import XPortraitMotion
    from comfyui_xportrait.nodes.reference import XPortraitReference

    g = torch.Generator().manual_seed(seed)
    image = torch.rand(RESOLUTION, RESOLUTION, 3, generator=g).numpy()
    reference = XPortraitReference([types.SimpleNamespace(image=image, resolution=RESOLUTION)])
    global_hint = (torch.rand(num_frames, 3, RESOLUTION, RESOLUTION, generator=g) * 2 - 1).numpy()
    local_hint = (torch.rand(num_frames, 3, RESOLUTION, RESOLUTION, generator=g) * 2 - 1).numpy()
    hints = types.SimpleNamespace(global_hint=global_hint, local_hint=local_hint, num_frames=num_frames,
                                  resolution=RESOLUTION)
    motion = XPortraitMotion(hints=hints, local_hint=local_hint, global_strength=1.0, local_strength=0.8)
    contexts = torch.randn(2, 1, 77, CONTEXT_WIDTH, generator=g)
    return reference, motion, contexts[0], contexts[1]


def ksampler_against_sampler(handle, model, num_frames: int, steps: int, seed: int,
                             with_custom_samplers: bool = False) -> dict:
    """KSampler (ddim, ddim_uniform, cfg 5) through the adapter against our DDIM on the same x_T and offsets."""
    from xportrait_core.sampling.guidance import GuidedDenoiser
    from xportrait_core.sampling.sampler import ddim_timesteps, sample_ddim

    reference, motion, context, uncond_context = stand_ins(num_frames, seed)
    positive, negative, latent = run_node("XPortraitConditioning", xportrait_model=handle,
                                          positive=[[context, {}]], negative=[[uncond_context, {}]],
                                          reference=reference, motion=motion, seed=seed + 1, window_overlap=4)
    # The reference net's calls during KSampler: the banks of up to 16 planned timesteps come from one call.
    bank_calls = []
    xportrait = handle.model
    original_bank = xportrait.reference_bank
    xportrait.reference_bank = lambda lat, t, ctx: bank_calls.append(ctx.shape[0]) or original_bank(lat, t, ctx)
    # Values compared on the host while sampling (on a GPU each waits for it to drain): latents or texts (floating
    # point), as opposed to the frame indices of the windows (int64, on the host).
    equal, compared = torch.equal, []
    torch.equal = lambda a, b: compared.append(a.dtype.is_floating_point) or equal(a, b)
    try:
        out = comfy_nodes.common_ksampler(model, seed, steps, 5.0, "ddim", "ddim_uniform", positive, negative,
                                          latent, denoise=1.0)[0]["samples"]
    finally:
        del xportrait.reference_bank
        torch.equal = equal
    scale = handle.config.vae.scale_factor
    comfy_x0 = out * scale

    # The same start in DDPM terms: ComfyUI samples x = z + sigma_0 * noise, the network sees x / sqrt(1 + sigma_0^2).
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "ddim_uniform", steps)
    comfy_timesteps = sampling.timestep(sigmas[:-1]).flip(0).tolist()
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    sigma_0 = float(sigmas[0])
    x_T = (latent["samples"] * scale + sigma_0 * noise) / math.sqrt(1 + sigma_0 ** 2)
    job = positive[0][1]["xportrait"].job
    denoiser = GuidedDenoiser.for_model(handle.model, job.reference_latents, global_hint=job.global_hint,
                                        local_hint=job.local_hint, guidance_scale=5.0, context=context,
                                        uncond_context=uncond_context, global_strength=job.global_strength,
                                        local_strength=job.local_strength)
    timesteps = ddim_timesteps(steps)
    last = {}
    ours = sample_ddim(denoiser, x_T, handle.model.alphas_cumprod, timesteps, window=16, overlap=4,
                       generator=torch.Generator().manual_seed(seed),
                       on_step=lambda done, total, denoised: last.update(x0=denoised.clone()))
    custom = {}
    if with_custom_samplers:
        # The same run through SamplerCustom and SamplerCustomAdvanced (their seed reaches the window offsets too).
        from comfy_extras import nodes_custom_sampler as custom_nodes

        (sigmas_out,) = custom_nodes.BasicScheduler().get_sigmas(model, "ddim_uniform", steps, 1.0)
        (sampler,) = custom_nodes.KSamplerSelect().get_sampler("ddim")
        (noise_source,) = custom_nodes.RandomNoise().get_noise(seed)
        (guider,) = custom_nodes.CFGGuider().get_guider(model, positive, negative, 5.0)
        advanced = custom_nodes.SamplerCustomAdvanced().sample(noise_source, guider, sampler, sigmas_out, latent)[0]
        plain = custom_nodes.SamplerCustom().sample(model, True, seed, 5.0, positive, negative, sampler, sigmas_out,
                                                    latent)[0]
        custom = {"sampler_custom_advanced_max_diff": float((advanced["samples"] - out).abs().max()),
                  "sampler_custom_max_diff": float((plain["samples"] - out).abs().max())}
    return {
        **custom,
        "frames": num_frames, "steps": steps, "reference_net_calls": bank_calls,
        "float_comparisons": sum(compared),
        "comfy_timesteps": [int(t) for t in comfy_timesteps], "official_timesteps": timesteps.tolist(),
        "max_abs": float(comfy_x0.abs().max()),
        "max_diff_vs_last_prediction": float((comfy_x0 - last["x0"]).abs().max()),
        "max_diff_vs_official_output": float((comfy_x0 - ours).abs().max()),
        "latent_shape": list(latent["samples"].shape),
        "reference_frames_differ": bool(not torch.equal(latent["samples"][0], latent["samples"][1])),
    }


# Hand-written SD1.5 diffusers names of some of the tiny UNet's weights (levels 0-2 carry attention, 3 does not):
# the LDM name each must land on.
DIFFUSERS_TO_LDM = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k": "input_blocks.5.1.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
    "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj":
        "output_blocks.5.1.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.3.attentions.0.transformer_blocks.0.attn1.to_out.0":
        "output_blocks.9.1.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
}


def write_lora(path: Path, unet_state: dict, style: str, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """A LoRA file over DIFFUSERS_TO_LDM's weights; returns the expected change of each (LDM name) at strength 1:
    up @ down * alpha / rank."""
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for i, (diffusers, ldm) in enumerate(DIFFUSERS_TO_LDM.items()):
        shape = unet_state[ldm + ".weight"].shape
        down = torch.randn((rank, *shape[1:]), generator=g) * 0.1
        up = torch.randn((shape[0], rank) + ((1, 1) if len(shape) == 4 else ()), generator=g) * 0.1
        if style == "kohya":  # kohya writes diffusers-style names; LDM-style names for every other module here
            key = "lora_unet_" + (diffusers if i % 2 == 0 else ldm).replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(alpha)})
            scale = alpha / rank
        elif style == "diffusers":  # no alpha: alpha = rank
            if ".to_" in diffusers:
                # Attention projections as diffusers' attention processors name them (ComfyUI 0.3.64 maps these;
                # it has no map for peft's `attn1.to_q.lora_A`).
                key = "unet." + diffusers.replace(".to_", ".processor.to_").removesuffix(".0")
                tensors.update({f"{key}_lora.down.weight": down, f"{key}_lora.up.weight": up})
            else:  # peft's lora_A / lora_B
                key = "unet." + diffusers
                tensors.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
            scale = 1.0
        else:
            raise ValueError(style)
        expected[ldm + ".weight"] = (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return expected


def lora_checks(handle, model) -> dict:
    unet = model.model.diffusion_model
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    results = {}
    for style in ("kohya", "diffusers"):
        expected = write_lora(loras / f"test_{style}.safetensors", original, style)
        for strength in (0.7, 0.0):
            patched = run_node("LoraLoaderModelOnly", model=model, lora_name=f"test_{style}.safetensors",
                               strength_model=strength)[0]
            comfy.model_management.load_models_gpu([patched])
            now = unet.state_dict()
            changed = sorted(k for k in original if not torch.equal(now[k], original[k]))
            worst = max((float((now[k] - original[k] - strength * expected[k]).abs().max()) for k in expected),
                        default=0.0)
            results[f"{style}@{strength}"] = {"changed": changed, "expected": sorted(expected),
                                              "max_error": worst,
                                              "delta_scale": max(float(d.abs().max()) for d in expected.values())}
            if strength:
                # Our Sampler's handle shares the UNet: making it ready takes the MODEL's LoRA off.
                handle.ready()
                plain = unet.state_dict()
                results[f"{style}@{strength}"]["plain_after_sampler_ready"] = all(
                    torch.equal(plain[k], original[k]) for k in original)
            # Back to the plain weights, as loading the unpatched model does.
            comfy.model_management.load_models_gpu([model])
            plain = unet.state_dict()
            assert all(torch.equal(plain[k], original[k]) for k in original)
    return results


@torch.no_grad()
def clip_and_vae_checks() -> dict:
    """The loader's CLIP and VAE against the model's own text encoder and VAE (checkpoint with a tiny CLIP)."""
    from pack_loader import tiny_checkpoint_with_text_encoder

    if not (models / "tiny_with_clip.safetensors").exists():
        tiny_checkpoint_with_text_encoder(GOLDEN_WEIGHTS, models / "tiny_with_clip.safetensors")
    handle, _model, clip, vae = run_node("XPortraitLoadModel", model_name="tiny_with_clip.safetensors",
                                         dtype="fp32", attention="auto")
    ours = handle.model
    (conditioning,) = run_node("CLIPTextEncode", clip=clip, text="")
    empty = ours.empty_prompt_context().float()
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, RESOLUTION // 8, RESOLUTION // 8, generator=g)
    scale = ours.config.vae.scale_factor
    (decoded,) = run_node("VAEDecode", vae=vae, samples={"samples": latents})
    our_decoded = ours.decode_latents(latents * scale).clamp(-1, 1).add(1).mul(0.5).permute(0, 2, 3, 1)
    images = torch.rand(2, RESOLUTION, RESOLUTION, 3, generator=g)
    (encoded,) = run_node("VAEEncode", vae=vae, pixels=images)
    our_mean = ours.encode_images(images.permute(0, 3, 1, 2) * 2 - 1, sample=False) / scale
    # The pack's network behind the VAE against ComfyUI's own SD1.5 autoencoder on the same weights, and the
    # tiled decode (which calls the network on overlapping tiles).
    comfy_vae = importlib.import_module(pack.__name__ + ".nodes.native.comfy_types").comfy_vae
    comfy_own = comfy_vae(ours, pack_network=False)
    (comfy_decoded,) = run_node("VAEDecode", vae=comfy_own, samples={"samples": latents})
    (comfy_encoded,) = run_node("VAEEncode", vae=comfy_own, pixels=images)
    tiled_args = dict(tile_size=64, overlap=16, temporal_size=64, temporal_overlap=8)
    (tiled,) = run_node("VAEDecodeTiled", vae=vae, samples={"samples": latents}, **tiled_args)
    (comfy_tiled,) = run_node("VAEDecodeTiled", vae=comfy_own, samples={"samples": latents}, **tiled_args)
    return {
        "vae_network": type(vae.first_stage_model).__name__,
        "vae_decode_vs_comfy": float((decoded - comfy_decoded).abs().max()),
        "vae_encode_vs_comfy": float((encoded["samples"] - comfy_encoded["samples"]).abs().max()),
        "vae_tiled_vs_comfy": float((tiled - comfy_tiled).abs().max()),
        "vae_tiled_shape": list(tiled.shape),
        "clip_shape": list(conditioning[0][0].shape),
        "clip_max_diff": float((conditioning[0][0].float() - empty).abs().max()),
        "clip_scale": float(empty.abs().max()),
        "vae_decode_max_diff": float((decoded - our_decoded).abs().max()),
        "vae_encode_max_diff": float((encoded["samples"] - our_mean).abs().max()),
        "vae_encode_scale": float(our_mean.abs().max()),
    }


def partial_loading_check(handle, model) -> dict:
    """KSampler with ComfyUI's --novram partial loading (every comfy.ops layer left offloaded and cast onto the
    compute device as it runs) against a full load. ComfyUI never loads partially on a CPU device, so it is told
    this CPU is a GPU with no memory (restored afterwards)."""
    import comfy.model_management as mm

    reference, motion, context, uncond_context = stand_ins(6, 3)
    positive, negative, latent = run_node("XPortraitConditioning", xportrait_model=handle,
                                          positive=[[context, {}]], negative=[[uncond_context, {}]],
                                          reference=reference, motion=motion, seed=1, window_overlap=4)

    def sample():
        return comfy_nodes.common_ksampler(model, 5, 3, 5.0, "ddim", "ddim_uniform", positive, negative, latent)[0]

    def our_sampler():
        return run_node("XPortraitSampler", xportrait_model=handle, reference=reference, motion=motion, seed=5,
                        steps=3, positive=[[context, {}]], negative=[[uncond_context, {}]])[0]

    full = sample()["samples"]
    full_ours = our_sampler()
    mm.unload_all_models()
    saved = mm.is_device_cpu, mm.vram_state, mm.lowvram_available
    mm.is_device_cpu, mm.vram_state, mm.lowvram_available = (lambda device: False), mm.VRAMState.NO_VRAM, True
    try:
        partial = sample()["samples"]
        cast = sum(1 for m in model.model.modules() if getattr(m, "comfy_cast_weights", False))
        partial_ours = our_sampler()
        ours_cast = sum(1 for m in handle.model.modules() if getattr(m, "comfy_cast_weights", False))
        ours_device = str(handle.model.compute_device)  # set by the node, not read off a weight
        ours_load_device = str(handle.patcher.load_device)
        # The pack's GroupNorm and LayerNorm kernels stand in front of ComfyUI's norms and must stand aside for these.
        norms = [m for m in model.model.modules() if isinstance(m, comfy.ops.disable_weight_init.GroupNorm)]
        norm_classes = sorted({type(m).__name__ for m in norms})
        norms_left_to_comfyui = sum(casts_weights_now(m) for m in norms)
        layer_norms = [m for m in model.model.modules() if isinstance(m, comfy.ops.disable_weight_init.LayerNorm)]
        layer_norm_classes = sorted({type(m).__name__ for m in layer_norms})
        layer_norms_left_to_comfyui = sum(casts_weights_now(m) for m in layer_norms)
        lowvram = bool(model.model.model_lowvram)
    finally:
        mm.unload_all_models()
        mm.is_device_cpu, mm.vram_state, mm.lowvram_available = saved
    return {"lowvram": lowvram, "layers_cast_on_the_fly": cast, "max_diff": float((partial - full).abs().max()),
            "max_abs": float(full.abs().max()), "group_norms": len(norms), "group_norm_classes": norm_classes,
            "group_norms_left_to_comfyui": norms_left_to_comfyui, "layer_norms": len(layer_norms),
            "layer_norm_classes": layer_norm_classes, "layer_norms_left_to_comfyui": layer_norms_left_to_comfyui,
            # Our own Sampler node on the same partially loaded networks.
            "sampler_layers_cast_on_the_fly": ours_cast, "sampler_device": ours_device,
            "sampler_load_device": ours_load_device, "sampler_max_diff": float((partial_ours - full_ours).abs().max()),
            "sampler_max_abs": float(full_ours.abs().max())}


def graphs_policy_check(handle, model) -> dict:
    """KSampler runs through the adapter, graphs otherwise possible (stood in: this machine has no GPU;
    tests/graph_stand_ins.py computes what a replay would, and counts): the LCM path's run (6 steps, cfg 1) stays
    eager the first time, records when re-queued with another seed, replays the third time; a short run with
    another strength stays eager; a run of MIN_GRAPHED_STEPS records at once and the next replays. ComfyUI's
    loading of the model for each run leaves the kept graphs; unloading it releases them."""
    import dataclasses

    import comfy.model_management as mm
    from graph_stand_ins import EagerGraphs
    from xportrait_core.fast import cuda_graphs

    adapter = model.model
    kept = adapter.kept_graphs
    kept.release()
    reference, motion, context, _ = stand_ins(6, 21)

    def conditioning(local_strength):
        return run_node("XPortraitConditioning", xportrait_model=handle, positive=[[context, {}]],
                        negative=[[context, {}]], reference=reference,
                        motion=dataclasses.replace(motion, local_strength=local_strength), seed=22, window_overlap=4)

    usual, other = conditioning(0.8), conditioning(0.6)
    saved = cuda_graphs.graphs_apply, cuda_graphs.GuidanceGraphs
    cuda_graphs.graphs_apply = lambda device, compiled=False, steps=None, cuda_malloc_async=True: (
        cuda_graphs.repays_recording(steps))
    cuda_graphs.GuidanceGraphs = EagerGraphs
    EagerGraphs.made.clear()
    runs = []
    try:
        for name, steps, (positive, negative, latent), seed in (
                ("short", 6, usual, 1), ("short_again", 6, usual, 2), ("short_third", 6, usual, 3),
                ("short_other_strength", 6, other, 4), ("long", cuda_graphs.MIN_GRAPHED_STEPS, other, 5),
                ("long_again", cuda_graphs.MIN_GRAPHED_STEPS, other, 6)):
            comfy_nodes.common_ksampler(model, seed, steps, 1.0, "lcm", "sgm_uniform", positive, negative, latent,
                                        denoise=1.0)
            runs.append({"name": name, "recordings": kept.recordings, "served_again": kept.served_again,
                         "window_calls": sum(graphs.calls for graphs in EagerGraphs.made),
                         "kept": kept.graphs is not None})
        # Kept graphs (fast/kept_graphs.py) go when ComfyUI takes the model off its device.
        mm.load_models_gpu([model])
        kept_after_reload = kept.graphs is not None
        mm.unload_all_models()
        released_on_unload = kept.graphs is None
    finally:
        cuda_graphs.graphs_apply, cuda_graphs.GuidanceGraphs = saved
        kept.release()
    return {"runs": runs, "min_graphed_steps": cuda_graphs.MIN_GRAPHED_STEPS,
            "kept_graphs_kept_on_reload": kept_after_reload, "kept_graphs_released_on_unload": released_on_unload}


def carried_branches_check(handle, model) -> dict:
    """A short KSampler run (lcm, 4 steps, cfg 1) queued again with another seed: the second run takes the first
    one's banks and hint features (sampling/carried_branches.py) and gives what a run that computes them gives."""
    adapter = model.model
    adapter.release_carried()
    reference, motion, context, _ = stand_ins(6, 31)
    positive, negative, latent = run_node("XPortraitConditioning", xportrait_model=handle, positive=[[context, {}]],
                                          negative=[[context, {}]], reference=reference, motion=motion, seed=32,
                                          window_overlap=4)
    xportrait = handle.model
    calls = {"banks": 0, "hints": 0}
    bank, hints = xportrait.reference_bank, xportrait.encode_motion_hints
    xportrait.reference_bank = lambda *a, **k: calls.__setitem__("banks", calls["banks"] + 1) or bank(*a, **k)
    xportrait.encode_motion_hints = lambda *a, **k: calls.__setitem__("hints", calls["hints"] + 1) or hints(*a, **k)

    def run(seed):
        before = dict(calls)
        out = comfy_nodes.common_ksampler(model, seed, 4, 1.0, "lcm", "sgm_uniform", positive, negative, latent,
                                          denoise=1.0)[0]["samples"]
        return out, {k: calls[k] - before[k] for k in calls}

    try:
        _, first = run(1)
        carried_out, second = run(2)
        adapter.release_carried()
        fresh_out, fresh = run(2)
    finally:
        del xportrait.reference_bank, xportrait.encode_motion_hints
        adapter.release_carried()
    return {"first_run_calls": first, "carried_run_calls": second, "fresh_run_calls": fresh,
            "max_diff_carried_vs_fresh": float((carried_out - fresh_out).abs().max()),
            "max_abs": float(fresh_out.abs().max())}


def main():
    import time

    handle, model, clip, vae = run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype="fp32",
                                        attention="auto")
    report = {"outputs": [type(o).__name__ for o in (handle, model, clip, vae)], "seconds": {}}
    checks = {
        "clip_vae": clip_and_vae_checks,
        "lora": lambda: lora_checks(handle, model),
        # One window a step, rotated by the drawn offset, at the official 30 steps.
        "ksampler_30": lambda: ksampler_against_sampler(handle, model, num_frames=6, steps=30, seed=11),
        # Two overlapping windows averaged per frame, at 4 steps (ddim_uniform's 4 = the official 4 timesteps).
        "ksampler_windows": lambda: ksampler_against_sampler(handle, model, num_frames=20, steps=4, seed=12,
                                                             with_custom_samplers=True),
        "graphs_policy": lambda: graphs_policy_check(handle, model),
        "carried_branches": lambda: carried_branches_check(handle, model),
        "partial_loading": lambda: partial_loading_check(handle, model),
    }
    for name, check in checks.items():
        start = time.perf_counter()
        report[name] = check()
        report["seconds"][name] = round(time.perf_counter() - start, 1)
    # benchmarks/bench_comfy.py as a CPU smoke test, in this process (ComfyUI is imported already).
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_comfy

    report["bench"] = bench_comfy.main(["--comfyui", COMFYUI_PATH, "--device", "cpu", "--config", "tiny",
                                        "--dtype", "fp32", "--frames", "4", "--steps", "2", "--lcm-steps", "2",
                                        "--runs", "1"])
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
