"""The ComfyUI nodes, called directly as ComfyUI calls them, with the tiny weights and the sample assets.

ComfyUI is not importable here: the nodes fall back to their own progress recorder and interruption flag, and find
model files through XPORTRAIT_MODELS_DIR instead of ComfyUI's models/xportrait.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pack_loader import ROOT, load_pack, node_classes, run_node, tiny_checkpoint_with_text_encoder

RESOLUTION = 64
NUM_FRAMES = 8
STEPS = 2

NODE_NAMES = {
    "XPortraitLoadModel": "X-Portrait Load Model",
    "XPortraitLoadReference": "X-Portrait Load Reference",
    "XPortraitExtractMotion": "X-Portrait Extract Motion",
    "XPortraitHierarchicalMotionAttention": "X-Portrait Hierarchical Motion Attention",
    "XPortraitSampler": "X-Portrait Sampler",
    "XPortraitIdentityCheck": "X-Portrait Identity Check",
    "XPortraitPasteBack": "X-Portrait Paste Back",
    "XPortraitWriteVideo": "X-Portrait Write Video (streaming)",
    "XPortraitConditioning": "X-Portrait Conditioning",
    "XPortraitLoadLoRA": "X-Portrait Load LoRA",
}


@pytest.fixture(scope="module")
def common():
    return load_pack().nodes.common


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, golden_state_dict_path):
    folder = tmp_path_factory.mktemp("models_xportrait")
    os.symlink(golden_state_dict_path, folder / "tiny.safetensors")
    tiny_checkpoint_with_text_encoder(golden_state_dict_path, folder / "tiny_with_clip.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(4, 4)}, str(folder / "not_xportrait.safetensors"))
    (folder / "garbage.ckpt").write_bytes(b"this is not a checkpoint")
    (folder / "readme.txt").write_text("not listed")
    loras = tmp_path_factory.mktemp("models_loras")
    from lora_files import write_kohya_lora
    from xportrait_core.model.checkpoint import load_xportrait

    # X-Portrait Load LoRA lists ComfyUI's models/loras (here XPORTRAIT_LORAS_DIR): one LoRA for the tiny UNet.
    write_kohya_lora(loras / "tiny_lora.safetensors", load_xportrait(golden_state_dict_path).unet, rank=4, alpha=2.0,
                     seed=9)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XPORTRAIT_MODELS_DIR", str(folder))
        patch.setenv("XPORTRAIT_LORAS_DIR", str(loras))
        yield folder
    from xportrait_core.model.attention import set_attention_backend

    set_attention_backend("auto")  # the loader sets the process-wide backend; leave the default behind


@pytest.fixture(scope="module")
def tiny(models_dir):
    return run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype="fp32", attention="auto")[0]


@pytest.fixture(scope="module")
def tiny_with_clip(models_dir):
    return run_node("XPortraitLoadModel", model_name="tiny_with_clip.safetensors", dtype="auto", attention="sdpa")[0]


def as_image(array_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array_uint8.astype(np.float32) / 255.0)


@pytest.fixture(scope="module")
def source_photo(source_image_path) -> torch.Tensor:
    """The sample portrait on a larger grey canvas, so the face crop lies strictly inside the photo."""
    from PIL import Image

    portrait = np.asarray(Image.open(source_image_path).convert("RGB"))
    canvas = np.full((640, 768, 3), 128, np.uint8)
    canvas[64:576, 128:640] = portrait
    return as_image(canvas)[None]


@pytest.fixture(scope="module")
def driving_frames(driving_video_path) -> torch.Tensor:
    from xportrait_core.media.video_io import read_video

    frames, _fps = read_video(driving_video_path, max_frames=NUM_FRAMES)
    return as_image(frames)


@pytest.fixture(scope="module")
def reference(source_photo):
    return run_node("XPortraitLoadReference", image=source_photo, crop_margin=0.5, resolution=RESOLUTION, mode="crop")


@pytest.fixture(scope="module")
def motion(reference, driving_frames):
    return run_node("XPortraitExtractMotion", reference=reference[0], driving_frames=driving_frames, best_frame=-1,
                    track_missed_faces=True)


def zero_conditioning(width: int = 32):
    return [[torch.zeros(1, 77, width), {"pooled_output": None}]]


def stand_in_comfyui(monkeypatch, **submodules):
    """Put stand-ins for ComfyUI's modules in sys.modules: comfy.<name> for each keyword (model_management,
    model_patcher, utils, latent_formats) and top-level modules given as top_<name> (latent_preview)."""
    import types

    comfy = types.ModuleType("comfy")
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    for name, module in submodules.items():
        if name.startswith("top_"):
            monkeypatch.setitem(sys.modules, name[4:], module)
        else:
            setattr(comfy, name, module)
            monkeypatch.setitem(sys.modules, f"comfy.{name}", module)


SAMPLER_ARGS = dict(seed=7, steps=STEPS, guidance=5.0, window_overlap=4, initial_latents="noised reference")


# ---- package and declarations -----------------------------------------------------------------------------------

def test_importing_the_package_is_light_and_needs_no_comfyui():
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from pack_loader import load_pack\n"
        "pack = load_pack()\n"
        "heavy = [m for m in ('torch', 'cv2', 'dlib', 'xportrait_core.model.xportrait', 'comfy') if m in sys.modules]\n"
        "print(sorted(pack.NODE_CLASS_MAPPINGS), heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{sorted(NODE_NAMES)} []"


def test_every_node_is_registered_with_a_readable_name():
    pack = load_pack()
    assert pack.NODE_CLASS_MAPPINGS.keys() == NODE_NAMES.keys()
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == NODE_NAMES


@pytest.mark.parametrize("name", sorted(NODE_NAMES))
def test_node_declarations_are_consistent(name, models_dir):
    cls = node_classes()[name]
    assert cls.CATEGORY == "X-Portrait"
    assert cls.DESCRIPTION.strip()
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    assert all(isinstance(t, str) and t for t in cls.RETURN_TYPES)
    assert cls.SEARCH_ALIASES and "portrait animation" in cls.SEARCH_ALIASES and "face reenactment" in cls.SEARCH_ALIASES
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    assert spec.get("hidden", {}) in ({}, {"unique_id": "UNIQUE_ID"})  # only to show text on the node
    inputs = {**spec["required"], **spec.get("optional", {})}
    parameters = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    assert set(parameters) - {"self"} == set(inputs) | set(spec.get("hidden", {})), \
        "the function takes exactly the declared inputs"
    if hasattr(cls, "VALIDATE_INPUTS"):
        checked = set(inspect.signature(cls.VALIDATE_INPUTS).parameters)
        assert checked <= set(inputs) and all(not isinstance(inputs[n][0], str) or inputs[n][0] in ("INT", "FLOAT")
                                              for n in checked), "VALIDATE_INPUTS takes widgets only"
        assert "model_name" not in checked or name == "XPortraitLoadModel"
    for input_name, (_kind, options) in spec.get("optional", {}).items():
        # ComfyUI leaves an unconnected optional input out of the call (and an older API prompt may lack a widget
        # added since): the function's default must stand in for it.
        assert parameters[input_name].default in (None, options.get("default")), \
            f"optional input {input_name} must default to None or its widget default"
    for input_name, (kind, options) in inputs.items():
        assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
        if isinstance(kind, list):
            assert kind, f"{name}.{input_name}: empty choice list"
            if "default" in options:
                assert options["default"] in kind
        elif kind in ("INT", "FLOAT"):
            assert options["min"] <= options["default"] <= options["max"]
        if "default" in options and input_name in parameters:
            assert parameters[input_name].default == options["default"], f"{name}.{input_name}: defaults differ"


def test_custom_socket_types_connect_only_x_portrait_nodes():
    produced = {t for cls in node_classes().values() for t in cls.RETURN_TYPES}
    assert {"XPORTRAIT_MODEL", "XPORTRAIT_REFERENCE", "XPORTRAIT_MOTION"} <= produced


# ---- X-Portrait Load Model ------------------------------------------------------------------------------------

def test_loader_lists_checkpoint_files_only(models_dir):
    choices = node_classes()["XPortraitLoadModel"].INPUT_TYPES()["required"]["model_name"][0]
    assert choices == ["garbage.ckpt", "not_xportrait.safetensors", "tiny.safetensors", "tiny_with_clip.safetensors"]


def test_loader_infers_the_config_and_applies_the_dtype(tiny, tiny_with_clip, models_dir):
    from xportrait_core.model.config import XPortraitConfig

    assert tiny.config == XPortraitConfig.tiny()
    assert tiny.model.dtype == torch.float32 and tiny.model.text_encoder is None
    assert tiny_with_clip.model.text_encoder is not None
    assert tiny_with_clip.model.dtype == torch.float32  # auto on CPU
    half = run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype="bf16", attention="auto")[0]
    assert half.model.dtype == torch.bfloat16


def test_loader_fp8_choices_come_last_and_store_the_diffusion_weights_in_fp8(models_dir):
    choices = node_classes()["XPortraitLoadModel"].INPUT_TYPES()["required"]["dtype"][0]
    # Saved workflows store the choice by name: the older choices keep their places.
    assert choices == ["auto", "fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2"]
    for name, stored in (("fp8_e4m3fn", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        model = run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype=name, attention="auto")[0].model
        # Outside ComfyUI: the pack's casting layers; computed in float32 on the CPU.
        assert model.operations.casts_weights and model.dtype == torch.float32 and model.storage_dtype == stored
        assert model.local_control.zero_convs[0][0].weight.dtype == stored
        assert model.vae.decoder.conv_out.weight.dtype == torch.float32


def test_loader_low_vram_places_idle_networks_apart_when_the_model_is_made_ready(models_dir, monkeypatch):
    from xportrait_core.fast import offload

    import types

    placed = []
    monkeypatch.setattr(offload, "place_for_low_vram",
                        lambda model, device, pin_idle: placed.append((device, pin_idle)) or model)
    low = run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype="fp32", attention="auto", vram="low")[0]
    normal = run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype="fp32", attention="auto")[0]
    assert low.low_vram and not normal.low_vram and "low_vram" in repr(low)
    normal.ready()
    assert placed == []
    low.ready()
    assert placed == [(low.model.device, True)]
    # ComfyUI's --disable-pinned-memory keeps the idle networks in ordinary (swappable) memory.
    stand_in_comfyui(monkeypatch, cli_args=types.SimpleNamespace(args=types.SimpleNamespace(disable_pinned_memory=True)))
    low.ready()
    assert placed[-1] == (low.model.device, False)
    with pytest.raises(ValueError, match="X-Portrait Load Model: vram is 'tiny'; choose one of normal, low"):
        run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype="fp32", attention="auto", vram="tiny")


@pytest.mark.parametrize("model_name, error, message", [
    ("not_xportrait.safetensors", ValueError,
     "^X-Portrait Load Model: not_xportrait.safetensors is not an X-Portrait checkpoint of a known size: compared "
     r"with the closest X-Portrait model, \d+ keys missing \(e.g. "),
    ("garbage.ckpt", ValueError, "^X-Portrait Load Model: garbage.ckpt is not a checkpoint"),
    ("missing.safetensors", FileNotFoundError, "^X-Portrait Load Model: model 'missing.safetensors' not found"),
    ("readme.txt", ValueError, "^X-Portrait Load Model: 'readme.txt' is not an X-Portrait checkpoint file"),
    ("", ValueError, "^X-Portrait Load Model: no model selected"),
])
def test_loader_refuses_wrong_files(models_dir, model_name, error, message):
    with pytest.raises(error, match=message) as err:
        run_node("XPortraitLoadModel", model_name=model_name, dtype="fp32", attention="auto")
    assert len(str(err.value)) < 400 and "Traceback" not in str(err.value)


def test_loader_refuses_forced_xformers_where_it_cannot_run(models_dir):
    from xportrait_core.model.attention import (
        get_attention_backend_setting,
        set_attention_backend,
    )

    set_attention_backend("sdpa")
    try:
        with pytest.raises(ValueError, match="^X-Portrait Load Model: attention 'xformers' cannot run: xformers runs "
                                             "on NVIDIA GPUs only.*Choose 'auto'"):
            run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype="fp32", attention="xformers")
        assert get_attention_backend_setting() == "sdpa", "a refused model leaves the setting as it was"
    finally:
        set_attention_backend("auto")


# ---- the chain -------------------------------------------------------------------------------------------------

def test_end_to_end_chain(tiny, source_photo, driving_frames, reference, motion, common):
    ref, crops, _faces = reference
    assert crops.shape == (1, RESOLUTION, RESOLUTION, 3) and crops.dtype == torch.float32
    x0, y0, x1, y1 = ref.primary.crop_box
    assert x1 - x0 == y1 - y0 and 0 < x0 and 0 < y0 and x1 < 768 and y1 < 640, "a square inside the canvas"

    motion_obj, global_hints, local_hints, best_frame, motion_report, motion_faces = motion
    assert motion_faces.shape == (1, *driving_frames.shape[1:])  # the driving frame the face was chosen on
    assert motion_report == f"Face found in {NUM_FRAMES} of {NUM_FRAMES} driving frames; aligned on driving frame {best_frame}."
    assert global_hints.shape == local_hints.shape == (NUM_FRAMES, RESOLUTION, RESOLUTION, 3)
    assert 0.0 <= float(global_hints.min()) and float(global_hints.max()) <= 1.0
    assert 0 <= best_frame < NUM_FRAMES and motion_obj.hints.best_frame == best_frame
    np.testing.assert_array_equal(global_hints.numpy(), (motion_obj.global_hint.transpose(0, 2, 3, 1) + 1) / 2)

    (controlled,) = run_node("XPortraitHierarchicalMotionAttention", xportrait_model=tiny, motion=motion_obj,
                             global_strength=1.0, local_strength=0.8, eyes=True, mouth=False)
    frames, latent = run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=controlled,
                              positive=zero_conditioning(), negative=None, **SAMPLER_ARGS)
    assert frames.shape == (NUM_FRAMES, RESOLUTION, RESOLUTION, 3) and frames.dtype == torch.float32
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0 and float(frames.std()) > 0
    assert latent["samples"].shape == (NUM_FRAMES, 4, RESOLUTION // 8, RESOLUTION // 8)

    similarity, report, plot, distance = run_node("XPortraitIdentityCheck", reference=ref, frames=frames,
                                                  threshold=0.6, driving_frames=driving_frames)
    assert isinstance(similarity, float) and isinstance(distance, float)
    assert f"identity over {NUM_FRAMES} frames" in report
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3

    full, mask = run_node("XPortraitPasteBack", frames=frames, reference=ref, feather=-1)
    assert full.shape == (NUM_FRAMES, 640, 768, 3) and mask.shape == (1, 640, 768)
    outside = torch.ones(640, 768, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert torch.equal(full[:, outside], source_photo.expand(NUM_FRAMES, -1, -1, -1)[:, outside])
    assert float(mask[0, outside].abs().max()) == 0.0 and float(mask.max()) == 1.0
    assert not torch.equal(full[:, ~outside], source_photo.expand(NUM_FRAMES, -1, -1, -1)[:, ~outside])


def test_sampler_is_the_core_pipeline(tiny, reference, motion):
    """The node adds nothing to the math: its frames and latents are the pipeline's, bit for bit."""
    from xportrait_core.sampling.pipeline import animate_latents, decode_frames

    ref, motion_obj = reference[0], motion[0]
    context = zero_conditioning()[0][0]
    frames, latent = run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=motion_obj,
                              positive=zero_conditioning(), negative=None, **SAMPLER_ARGS)
    latents = animate_latents(tiny.model, ref.prepared, motion_obj.hints, steps=STEPS, guidance_scale=5.0,
                              overlap=4, seed=7, context=context, uncond_context=context)
    assert torch.equal(frames, torch.from_numpy(decode_frames(tiny.model, latents)))
    scale = tiny.config.vae.scale_factor
    torch.testing.assert_close(latent["samples"] * scale, latents, rtol=1e-6, atol=1e-7)

    other, _ = run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=motion_obj,
                        positive=zero_conditioning(), negative=None, **{**SAMPLER_ARGS, "seed": 8})
    assert not torch.equal(frames, other), "the seed reaches the sampler"


def test_lora_node_and_lcm_sampler_are_the_core_path(tiny, reference, motion, models_dir, tmp_path, monkeypatch):
    """X-Portrait Load LoRA gives a model with the LoRA merged into its own UNet copy (the input model and every
    other network untouched and shared); the Sampler's 'lcm' choice is the pipeline's LCM sampler, bit for bit."""
    from lora_files import write_kohya_lora

    from xportrait_core.sampling.pipeline import animate_latents

    monkeypatch.setenv("XPORTRAIT_LORAS_DIR", str(tmp_path))
    expected = write_kohya_lora(tmp_path / "lcm.safetensors", tiny.model.unet, rank=4, alpha=2.0, seed=10)
    original = {k: v.clone() for k, v in tiny.model.unet.state_dict().items()}
    assert "lcm.safetensors" in node_classes()["XPortraitLoadLoRA"].INPUT_TYPES()["required"]["lora_name"][0]
    (with_lora,) = run_node("XPortraitLoadLoRA", xportrait_model=tiny, lora_name="lcm.safetensors", strength=0.5)
    (again,) = run_node("XPortraitLoadLoRA", xportrait_model=tiny, lora_name="lcm.safetensors", strength=0.5)
    merged, base = with_lora.model.unet.state_dict(), tiny.model.unet.state_dict()
    for key, weight in original.items():
        assert torch.equal(base[key], weight), "the input model is unchanged"
        torch.testing.assert_close(merged[key], weight + 0.5 * expected.get(key, 0), rtol=1e-6, atol=1e-6)
        assert torch.equal(again.model.unet.state_dict()[key], merged[key]), "re-running merges once"
    assert with_lora.model.reference_net is tiny.model.reference_net and with_lora.model.vae is tiny.model.vae
    assert with_lora.model.unet is not tiny.model.unet
    with pytest.raises(FileNotFoundError, match="X-Portrait Load LoRA: .*not found"):
        run_node("XPortraitLoadLoRA", xportrait_model=tiny, lora_name="missing.safetensors", strength=1.0)
    with pytest.raises(ValueError, match="X-Portrait Load LoRA: strength must be a finite number"):
        run_node("XPortraitLoadLoRA", xportrait_model=tiny, lora_name="lcm.safetensors", strength=float("nan"))

    ref, motion_obj = reference[0], motion[0]
    context = zero_conditioning()[0][0]
    args = {**SAMPLER_ARGS, "guidance": 1.5}
    _, latent = run_node("XPortraitSampler", xportrait_model=with_lora, reference=ref, motion=motion_obj,
                         positive=zero_conditioning(), negative=None, sampler="lcm", **args)
    latents = animate_latents(with_lora.model, ref.prepared, motion_obj.hints, steps=STEPS, guidance_scale=1.5,
                              overlap=4, seed=7, context=context, uncond_context=context, sampler="lcm")
    scale = tiny.config.vae.scale_factor
    torch.testing.assert_close(latent["samples"] * scale, latents, rtol=1e-6, atol=1e-7)
    _, ddim = run_node("XPortraitSampler", xportrait_model=with_lora, reference=ref, motion=motion_obj,
                       positive=zero_conditioning(), negative=None, **args)
    assert not torch.allclose(ddim["samples"], latent["samples"]), "the sampler choice reaches the pipeline"
    with pytest.raises(ValueError, match="lcm sampler takes at most 50 steps"):
        run_node("XPortraitSampler", xportrait_model=with_lora, reference=ref, motion=motion_obj,
                 sampler="lcm", **{**args, "steps": 60})


def test_sampler_starts_from_init_frames_when_asked(tiny, reference, motion, caplog):
    """'noised init frames' starts from another animation of the same crop (the official face-vid2vid option),
    exactly as the core's init="video"; without it the frames are ignored, with a warning."""
    from xportrait_core.sampling.pipeline import animate_latents

    ref, motion_obj = reference[0], motion[0]
    context = zero_conditioning()[0][0]
    first, _ = run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=motion_obj,
                        positive=zero_conditioning(), negative=None, **SAMPLER_ARGS)
    args = {**SAMPLER_ARGS, "initial_latents": "noised init frames"}
    refined, latent = run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=motion_obj,
                               positive=zero_conditioning(), negative=None, init_frames=first, **args)
    expected = animate_latents(tiny.model, ref.prepared, motion_obj.hints, steps=STEPS, guidance_scale=5.0, overlap=4,
                               seed=7, context=context, uncond_context=context, init="video",
                               init_frames=first.numpy())
    torch.testing.assert_close(latent["samples"] * tiny.config.vae.scale_factor, expected, rtol=1e-6, atol=1e-7)
    assert (refined - first).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs init_frames connected"):
        run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=motion_obj,
                 positive=zero_conditioning(), negative=None, **args)
    with pytest.raises(ValueError, match=f"init_frames has 2 frames; the motion has {NUM_FRAMES}"):
        run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=motion_obj,
                 positive=zero_conditioning(), negative=None, init_frames=first[:2], **args)
    with caplog.at_level("WARNING", logger="xportrait"):
        unused, _ = run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=motion_obj,
                             positive=zero_conditioning(), negative=None, init_frames=first, **SAMPLER_ARGS)
    assert torch.equal(unused, first) and "init_frames is connected but initial_latents is" in caplog.text


def test_zero_local_strength_is_no_local_control(tiny, reference, motion):
    from xportrait_core.sampling.pipeline import animate

    ref, motion_obj = reference[0], motion[0]
    (global_only,) = run_node("XPortraitHierarchicalMotionAttention", xportrait_model=tiny, motion=motion_obj,
                              global_strength=1.0, local_strength=0.0, eyes=True, mouth=True)
    frames, _ = run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=global_only,
                         positive=zero_conditioning(), negative=None, **SAMPLER_ARGS)
    context = zero_conditioning()[0][0]
    expected = animate(tiny.model, ref.prepared, global_hint=motion_obj.global_hint, local_hint=None, steps=STEPS,
                       guidance_scale=5.0, overlap=4, seed=7, context=context, uncond_context=context)
    assert torch.equal(frames, torch.from_numpy(expected))


def test_region_switches_and_mask_shape_the_local_hint(tiny, motion):
    motion_obj = motion[0]
    hint, boxes = motion_obj.hints.local_hint, motion_obj.hints.local_boxes
    assert motion_obj.hints.faces_found.all()

    def local(**kwargs):
        (out,) = run_node("XPortraitHierarchicalMotionAttention", xportrait_model=tiny, motion=motion_obj,
                          global_strength=1.0, local_strength=1.0, **{"eyes": True, "mouth": True, **kwargs})
        assert out.global_hint is motion_obj.global_hint
        return out.local_hint

    assert local() is hint
    no_eyes = local(eyes=False)
    frame = 0
    mx0, my0, mx1, my1 = boxes[frame, 2]
    np.testing.assert_array_equal(no_eyes[frame, :, my0:my1, mx0:mx1], hint[frame, :, my0:my1, mx0:mx1])
    for x0, y0, x1, y1 in boxes[frame, :2]:
        eye = np.zeros(hint.shape[-2:], bool)
        eye[y0:y1, x0:x1] = True
        eye[my0:my1, mx0:mx1] = False  # at 64px the mouth box may overlap an eye box
        assert (no_eyes[frame][:, eye] == -1.0).all()
    assert (local(eyes=False, mouth=False) == -1.0).all()

    assert (local(region_mask=torch.zeros(1, 32, 32)) == -1.0).all()
    np.testing.assert_array_equal(local(region_mask=torch.ones(1, 100, 100)), hint)
    half = local(region_mask=torch.full((NUM_FRAMES, 16, 16), 0.5))
    np.testing.assert_allclose(half, (hint - 1.0) / 2.0, atol=1e-6)
    with pytest.raises(ValueError, match="region mask has 3 frames"):
        local(region_mask=torch.ones(3, 16, 16))


def test_default_conditioning_is_the_checkpoints_empty_prompt(tiny_with_clip, reference, motion):
    ref, motion_obj = reference[0], motion[0]
    default, _ = run_node("XPortraitSampler", xportrait_model=tiny_with_clip, reference=ref, motion=motion_obj,
                          positive=None, negative=None, **SAMPLER_ARGS)
    empty = [[tiny_with_clip.model.empty_prompt_context().cpu(), {}]]
    explicit, _ = run_node("XPortraitSampler", xportrait_model=tiny_with_clip, reference=ref, motion=motion_obj,
                           positive=empty, negative=empty, **SAMPLER_ARGS)
    assert torch.equal(default, explicit)
    assert float(empty[0][0].abs().max()) > 0, "a random CLIP's empty prompt is not the zero conditioning"


def test_identity_check_on_real_faces(driving_frames, source_image_path):
    from PIL import Image

    photo = as_image(np.asarray(Image.open(source_image_path).convert("RGB")))[None]
    ref, crops, _faces = run_node("XPortraitLoadReference", image=photo, crop_margin=0.5, resolution=512, mode="crop")
    same, report, _plot, distance = run_node("XPortraitIdentityCheck", reference=ref, frames=crops.repeat(3, 1, 1, 1),
                                             threshold=0.6, driving_frames=None)
    assert distance < 1e-4 and same > 0.9999 and "frames over 0.60: 0" in report
    frames = driving_frames[:3]
    similarity, report, plot, distance = run_node("XPortraitIdentityCheck", reference=ref, frames=frames,
                                                  threshold=0.6, driving_frames=frames)
    assert np.isfinite(distance) and distance > 0.3 and similarity < same
    assert "frames closer to the driving actor than to the reference: 3" in report
    assert plot.shape[-1] == 3 and float(plot.min()) < 0.5 < float(plot.max())


# ---- progress and interruption ----------------------------------------------------------------------------------

def test_sampler_reports_progress_per_model_call(tiny, reference, motion, common, monkeypatch):
    bars = []

    class Recorder(common.Progress):
        def __init__(self, total=1):
            super().__init__(total)
            bars.append(self)

    monkeypatch.setattr(common, "Progress", Recorder)
    run_node("XPortraitSampler", xportrait_model=tiny, reference=reference[0], motion=motion[0],
             positive=zero_conditioning(), negative=None, **SAMPLER_ARGS)
    (bar,) = bars
    done = [d for d, _ in bar.updates]
    total = bar.updates[-1][1]
    # One update per model window call (2 DDIM steps x 1 window for 8 frames) and per decoded chunk, ending full.
    from xportrait_core.sampling.pipeline import DECODE_CHUNK

    decode_chunks = -(-NUM_FRAMES // DECODE_CHUNK)
    assert done == list(range(1, total + 1)) and total == STEPS + decode_chunks
    assert {t for _, t in bar.updates} == {total}


def test_interruption_stops_the_sampler_and_clears_the_flag(tiny, reference, motion, common):
    common.request_interrupt()
    with pytest.raises(common.Interrupted):
        run_node("XPortraitSampler", xportrait_model=tiny, reference=reference[0], motion=motion[0],
                 positive=zero_conditioning(), negative=None, **SAMPLER_ARGS)
    assert not common.processing_interrupted()


def test_interruption_stops_motion_extraction(reference, driving_frames, common):
    common.request_interrupt()
    with pytest.raises(common.Interrupted):
        run_node("XPortraitExtractMotion", reference=reference[0], driving_frames=driving_frames, best_frame=-1,
                 track_missed_faces=True)
    assert not common.processing_interrupted()


def test_identity_check_reports_progress_and_stops_between_frames(reference, driving_frames, common, monkeypatch):
    bars = []

    class Recorder(common.Progress):
        interrupt_at = None

        def __init__(self, total=1):
            super().__init__(total)
            bars.append(self)

        def __call__(self, done, total):
            super().__call__(done, total)
            if done == self.interrupt_at:
                common.request_interrupt()

    monkeypatch.setattr(common, "Progress", Recorder)
    n = len(driving_frames)
    run_node("XPortraitIdentityCheck", reference=reference[0], frames=driving_frames, threshold=0.6,
             driving_frames=driving_frames)
    assert bars[-1].updates == [(i, 2 * n) for i in range(1, 2 * n + 1)]  # output frames, then driving frames
    Recorder.interrupt_at = 2
    with pytest.raises(common.Interrupted):
        run_node("XPortraitIdentityCheck", reference=reference[0], frames=driving_frames, threshold=0.6)
    assert bars[-1].updates == [(1, n), (2, n)]  # stopped at the next frame
    assert not common.processing_interrupted()


# ---- bad input ------------------------------------------------------------------------------------------------------

def test_no_face_in_the_reference_is_a_clear_error():
    blank = torch.full((2, 256, 256, 3), 0.5)
    with pytest.raises(ValueError, match="^X-Portrait Load Reference: No face was found in reference image 1 of 2.*Mode 'resize' needs no face"):
        run_node("XPortraitLoadReference", image=blank, crop_margin=0.5, resolution=RESOLUTION, mode="crop")


@pytest.mark.parametrize("node, inputs, message", [
    ("XPortraitLoadReference", dict(image=torch.zeros(0, 64, 64, 3), crop_margin=0.5, resolution=64, mode="crop"),
     "the image batch is empty"),
    ("XPortraitLoadReference", dict(image=torch.zeros(1, 64, 64, 3), crop_margin=0.5, resolution=96, mode="crop"),
     "multiple of 64"),
    ("XPortraitLoadReference", dict(image=torch.zeros(1, 64, 64, 3), crop_margin=0.5, resolution=64, mode="zoom"),
     "mode is 'zoom'; choose one of crop, resize"),
    ("XPortraitPasteBack", dict(frames=torch.zeros(0, 64, 64, 3), reference=None, feather=-1),
     "must come from X-Portrait Load Reference"),
])
def test_bad_inputs_are_clear_errors(node, inputs, message):
    with pytest.raises(ValueError, match=message):
        run_node(node, **inputs)


def test_bad_inputs_between_nodes(tiny, reference, motion, driving_frames):
    ref, motion_obj = reference[0], motion[0]
    with pytest.raises(ValueError, match="driving video has 8 frames"):
        run_node("XPortraitExtractMotion", reference=ref, driving_frames=driving_frames, best_frame=8,
                 track_missed_faces=True)
    with pytest.raises(ValueError, match="driving_frames: the image batch is empty"):
        run_node("XPortraitExtractMotion", reference=ref, driving_frames=driving_frames[:0], best_frame=-1,
                 track_missed_faces=True)
    with pytest.raises(ValueError, match="'motion' must come from X-Portrait Extract Motion"):
        run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=driving_frames,
                 positive=None, negative=None, **SAMPLER_ARGS)
    with pytest.raises(ValueError, match="'xportrait_model' must come from X-Portrait Load Model"):
        run_node("XPortraitSampler", xportrait_model="tiny.safetensors", reference=ref, motion=motion_obj,
                 positive=None, negative=None, **SAMPLER_ARGS)
    with pytest.raises(ValueError, match="768 wide but this X-Portrait model takes 32.*SD1.5 CLIP"):
        run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=motion_obj,
                 positive=zero_conditioning(768), negative=None, **SAMPLER_ARGS)
    with pytest.raises(ValueError, match="holds 2 conditionings"):
        run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=motion_obj,
                 positive=zero_conditioning() * 2, negative=None, **SAMPLER_ARGS)
    with pytest.raises(ValueError, match="no CLIP text encoder.*CLIP Text Encode"):
        run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=motion_obj,
                 positive=None, negative=None, **SAMPLER_ARGS)
    with pytest.raises(ValueError, match="got 8 frames but 3 driving frames"):
        run_node("XPortraitIdentityCheck", reference=ref, frames=driving_frames, threshold=0.6,
                 driving_frames=driving_frames[:3])
    with pytest.raises(ValueError, match="X-Portrait Paste Back: feather is -2; it must be between -1 and 4096"):
        run_node("XPortraitPasteBack", frames=driving_frames, reference=ref, feather=-2)


def test_reference_and_motion_resolutions_must_match(tiny, motion, source_photo):
    other, _, _ = run_node("XPortraitLoadReference", image=source_photo, crop_margin=0.5, resolution=128, mode="resize")
    with pytest.raises(ValueError, match="reference is 128px but the motion was extracted at 64px"):
        run_node("XPortraitSampler", xportrait_model=tiny, reference=other, motion=motion[0],
                 positive=zero_conditioning(), negative=None, **SAMPLER_ARGS)


def test_loader_asks_comfyui_for_the_weights_and_the_working_memory(tiny, monkeypatch):
    """Inside ComfyUI the model is made ready by `load_models_gpu`, with the working memory the sampler asks for,
    so other models are unloaded when the activations would not fit beside them. ComfyUI is stood in for here."""
    import types

    calls = []
    management = types.SimpleNamespace(get_torch_device=lambda: torch.device("cpu"),
                                       unet_offload_device=lambda: torch.device("cpu"),
                                       load_models_gpu=lambda models, **kwargs: calls.append((models, kwargs)))
    made = types.SimpleNamespace(load_device=torch.device("cpu"))
    patcher = types.SimpleNamespace(ModelPatcher=lambda model, load_device, offload_device: made)
    stand_in_comfyui(monkeypatch, model_management=management, model_patcher=patcher)
    loader = load_pack().nodes.loader
    monkeypatch.setattr(loader, "_managed_module", lambda model, low_vram=False: model)
    handle = loader.LoadedXPortrait(tiny.model, "tiny", "auto")
    monkeypatch.setattr(tiny.model, "compute_device", None)
    assert handle.ready(memory_required=123) is tiny.model
    assert calls == [([made], {"memory_required": 123, "force_full_load": True})]
    # Partially loaded weights may lie in system memory: the networks compute on ComfyUI's device all the same.
    assert tiny.model.compute_device == made.load_device


def test_sampler_asks_for_room_for_its_working_memory(tiny, reference, motion, monkeypatch):
    from xportrait_core.fast.offload import sampling_working_memory

    asked = []
    original = tiny.ready
    monkeypatch.setattr(tiny, "ready", lambda memory_required=0: asked.append(memory_required) or original())
    ref, motion_obj = reference[0], motion[0]
    run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=motion_obj,
             positive=zero_conditioning(), negative=None, **SAMPLER_ARGS)
    assert asked == [sampling_working_memory(ref.resolution, NUM_FRAMES, torch.float32, NUM_FRAMES,
                                             tiny.config.unet.model_channels)]
    assert asked[0] > 0


def test_loader_compile_option_compiles_once_on_a_cuda_device_only(models_dir, monkeypatch):
    from xportrait_core.fast import compilation as acceleration

    compiled = []
    monkeypatch.setattr(acceleration, "compile_networks", lambda model, **kw: compiled.append(model) or model)
    handle = run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype="fp32", attention="auto",
                      compile=True)[0]
    assert handle.compile and "compile" in repr(handle)
    handle.ready()
    assert compiled == []  # CPU: runs uncompiled (with a note in the log)
    plain = run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype="fp32", attention="auto")[0]
    assert not plain.compile
    # On a CUDA device it compiles, once, after placement.
    monkeypatch.setattr(type(handle.model), "device", property(lambda self: torch.device("cuda")))
    handle._compiled = False
    monkeypatch.setattr(handle, "patcher", None)
    monkeypatch.setattr(load_pack().nodes.common, "torch_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(handle.model, "to", lambda *a, **k: handle.model)
    handle.ready()
    handle.ready()
    assert compiled == [handle.model]


def test_low_vram_hands_comfyui_only_the_networks_that_stay_on_the_gpu(tiny, monkeypatch):
    """In low-VRAM mode ComfyUI manages (loads, counts, offloads) the sampling networks and the text encoder only;
    the reference net and VAE stay in system memory, and the room they need when they visit is asked for."""
    import types

    from xportrait_core.fast import offload

    calls, wrapped = [], []
    management = types.SimpleNamespace(get_torch_device=lambda: torch.device("cpu"),
                                       unet_offload_device=lambda: torch.device("cpu"),
                                       load_models_gpu=lambda models, **kwargs: calls.append((models, kwargs)))
    patcher = types.SimpleNamespace(ModelPatcher=lambda model, load_device, offload_device: wrapped.append(model)
                                    or types.SimpleNamespace(load_device=load_device))
    stand_in_comfyui(monkeypatch, model_management=management, model_patcher=patcher)
    loader = load_pack().nodes.loader
    model = tiny.model
    low = loader.LoadedXPortrait(model, "tiny", "auto", low_vram=True)
    normal = loader.LoadedXPortrait(model, "tiny", "auto")
    managed_low, managed_normal = wrapped
    ids = lambda module: {id(p) for p in module.parameters()}  # noqa: E731
    resident = set().union(*(ids(getattr(model, n)) for n in ("unet", "global_control", "local_control")))
    assert ids(managed_low) == resident and ids(managed_normal) == ids(model)
    assert not ids(managed_low) & (ids(model.reference_net) | ids(model.vae))
    assert managed_low.device == managed_normal.device == model.device

    low.ready(memory_required=1000)
    normal.ready(memory_required=1000)
    reference_net_bytes = offload.network_bytes(model.reference_net)
    assert reference_net_bytes > offload.network_bytes(model.vae) > 0
    assert calls[0][1]["memory_required"] == reference_net_bytes + 1000 // 32  # the reference net's visit
    assert calls[1][1]["memory_required"] == 1000
    assert offload.low_vram_memory_required(model, 10**12) == 10**12  # sampling's activations, when larger


def test_sampler_previews_each_step_through_comfyuis_latent_previewer(tiny, reference, motion, monkeypatch):
    """With ComfyUI's previews on, every step sends a preview of a few frames' x_0 with the progress bar, as
    ComfyUI's own samplers do. ComfyUI's progress bar and previewer are stood in for here."""
    import types

    sent, decoded = [], []

    class Bar:
        def __init__(self, total):
            pass

        def update_absolute(self, value, total=None, preview=None):
            sent.append((value, total, preview))

    class Previewer:
        def decode_latent_to_preview_image(self, preview_format, x0):
            decoded.append(tuple(x0.shape))
            return (preview_format, "image", 512)

    utils = types.SimpleNamespace(ProgressBar=Bar)
    formats = types.SimpleNamespace(SD15=lambda: "sd15")
    previews = types.SimpleNamespace(get_previewer=lambda device, latent_format: Previewer())
    stand_in_comfyui(monkeypatch, utils=utils, latent_formats=formats, top_latent_preview=previews)
    monkeypatch.setattr(load_pack().nodes.common, "torch_device", lambda: torch.device("cpu"))
    ref, motion_obj = reference[0], motion[0]
    run_node("XPortraitSampler", xportrait_model=tiny, reference=ref, motion=motion_obj,
             positive=zero_conditioning(), negative=None, **SAMPLER_ARGS)
    latent = ref.resolution // 8
    assert decoded == [(1, 4, latent, 4 * latent)] * STEPS  # four frames side by side, once a step
    previewed = [entry for entry in sent if entry[2] is not None]
    assert [entry[2] for entry in previewed] == [("JPEG", "image", 512)] * STEPS
    assert all(value <= total for value, total, _ in sent)


def test_the_model_handle_keeps_the_samplers_graphs_until_comfyui_unloads_the_networks(tiny):
    """X-Portrait Load Model's handle owns the Sampler's kept CUDA graphs: ComfyUI's detach without moving the
    weights (every node's reload) keeps them, an unload (unpatch_all) releases them."""
    import types

    from xportrait_core.fast.kept_graphs import KeptSamplerGraphs

    handle = load_pack().nodes.loader.LoadedXPortrait(tiny.model, "tiny", "auto")
    assert isinstance(handle.kept_graphs, KeptSamplerGraphs)
    released = []
    handle.kept_graphs._graphed = types.SimpleNamespace(release=lambda: released.append(1))
    handle._on_detach(handle.patcher, False)
    assert handle.kept_graphs.graphed is not None and not released
    handle._on_detach(handle.patcher, True)
    assert handle.kept_graphs.graphed is None and released == [1]
