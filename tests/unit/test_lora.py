"""SD1.5 LoRAs merged into the X-Portrait UNet: the diffusers -> LDM module map (against diffusers' own UNet), the
kohya and diffusers/peft formats, strength, what is ignored and what is refused, and the CLI's --lora."""
from __future__ import annotations

import copy
import logging
import os

import pytest
import torch

from xportrait_core.model.config import XPortraitConfig
from xportrait_core.model.lora import (
    LoraError,
    ldm_to_diffusers,
    load_unet_lora,
    lora_module_names,
    merge_lora_file,
    unet_weight_shapes,
)

from lora_files import write_diffusers_lora, write_kohya_lora


def _diffusers_unet(cfg):
    """diffusers' SD1.5 UNet2DConditionModel shaped like `cfg`, on the meta device (no weights)."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"diffusers is needed to check the LoRA key map ({exc}); install the 'test' extra")
        pytest.skip(f"diffusers not installed ({exc})")
    levels = len(cfg.channel_mult)
    attention = [2 ** level in cfg.attention_resolutions for level in range(levels)]
    with torch.device("meta"):
        return UNet2DConditionModel(
            in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
            layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
            attention_head_dim=cfg.num_heads)


@pytest.mark.parametrize("preset", ["official", "tiny"])
def test_module_map_matches_diffusers_sd15_unet(preset):
    cfg = getattr(XPortraitConfig, preset)().unet
    theirs = {name[: -len(".weight")]: p.shape for name, p in _diffusers_unet(cfg).named_parameters()
              if name.endswith(".weight") and p.ndim in (2, 4)}
    ours = unet_weight_shapes(cfg)
    mapped = {ldm_to_diffusers(module, cfg): shape for module, shape in ours.items()}
    assert None not in mapped
    assert len(mapped) == len(ours) == len(theirs)  # one-to-one
    assert set(mapped) == set(theirs)
    assert {name: tuple(shape) for name, shape in mapped.items()} == {n: tuple(s) for n, s in theirs.items()}
    assert len(ours) > 250


def test_module_map_known_official_names():
    cfg = XPortraitConfig.official().unet
    known = {
        "input_blocks.0.0": "conv_in",
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks.2.1.transformer_blocks.0.attn2.to_out.0":
            "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks.5.0.emb_layers.1": "down_blocks.1.resnets.1.time_emb_proj",
        "input_blocks.9.0.op": "down_blocks.2.downsamplers.0.conv",
        "input_blocks.11.0.out_layers.3": "down_blocks.3.resnets.1.conv2",
        "middle_block.0.in_layers.2": "mid_block.resnets.0.conv1",
        "middle_block.1.proj_out": "mid_block.attentions.0.proj_out",
        "middle_block.2.out_layers.3": "mid_block.resnets.1.conv2",
        "output_blocks.0.0.skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
        "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.3.1.proj_in": "up_blocks.1.attentions.0.proj_in",
        "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks.8.1.transformer_blocks.0.ff.net.2": "up_blocks.2.attentions.2.transformer_blocks.0.ff.net.2",
        "output_blocks.9.1.transformer_blocks.0.ff.net.0.proj":
            "up_blocks.3.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "output_blocks.11.0.emb_layers.1": "up_blocks.3.resnets.2.time_emb_proj",
        "out.2": "conv_out",
    }
    for ldm, diffusers in known.items():
        assert ldm_to_diffusers(ldm, cfg) == diffusers, ldm
    names = lora_module_names(cfg)
    assert names["down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == \
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert names["input_blocks_1_1_transformer_blocks_0_attn1_to_q"] == "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert names["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    # Not SD1.5 modules: the motion modules and layers without weights.
    assert ldm_to_diffusers("input_blocks.1.0.in_layers.0", cfg) is None
    assert not any("motion" in k for k in names.values())


@pytest.fixture
def unet(tiny_model):
    return copy.deepcopy(tiny_model.unet)  # merging is in place: never into the session's model


def _assert_merged(before: dict, after: dict, expected: dict, strength: float):
    changed = 0
    for key, weight in before.items():
        if key in expected:
            torch.testing.assert_close(after[key], weight + strength * expected[key], rtol=1e-6, atol=1e-6)
            assert not torch.equal(after[key], weight)
            changed += 1
        else:  # norms, biases, motion modules
            assert torch.equal(after[key], weight), key
    assert changed == len(expected) > 250


@pytest.mark.parametrize("strength", [1.0, 0.7, -0.5])
def test_kohya_lora_changes_weights_by_up_down_alpha_over_rank(tmp_path, unet, strength, caplog):
    path = tmp_path / "kohya.safetensors"
    expected = write_kohya_lora(path, unet, rank=4, alpha=2.0, seed=1)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="xportrait"):
        lora = merge_lora_file(unet, path, strength)
    _assert_merged(before, unet.state_dict(), expected, strength)
    assert lora.text_encoder_keys == 3 and lora.unmatched == []
    assert "text-encoder keys are ignored" in caplog.text and "WARNING" not in caplog.text


@pytest.mark.parametrize("style,alpha,suffix", [("peft", None, ".safetensors"), ("old", 8.0, ".safetensors"),
                                                ("peft", 3.0, ".pt")])
def test_diffusers_lora_changes_weights_by_up_down_alpha_over_rank(tmp_path, unet, style, alpha, suffix):
    path = tmp_path / f"diffusers_{style}{suffix}"
    expected = write_diffusers_lora(path, unet, rank=2, alpha=alpha, seed=2, style=style)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    merge_lora_file(unet, path, 0.8)
    _assert_merged(before, unet.state_dict(), expected, 0.8)


def test_other_spellings_attention_processors_comfyui_ldm_names_and_peft_default(tmp_path, unet):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(8)
    shapes = dict(unet_weight_shapes(unet.config))
    targets = {  # file module name -> our module
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q":
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out":
            "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
        "diffusion_model.input_blocks.1.0.in_layers.2": "input_blocks.1.0.in_layers.2",
        "base_model.model.up_blocks.1.attentions.0.proj_in": "output_blocks.3.1.proj_in",
    }
    suffixes = [("_lora.down.weight", "_lora.up.weight"), ("_lora.down.weight", "_lora.up.weight"),
                (".lora_down.weight", ".lora_up.weight"), (".lora_A.default.weight", ".lora_B.default.weight")]
    tensors, expected = {}, {}
    for (name, ours), suffix in zip(targets.items(), suffixes):
        shape = shapes[ours]
        down = torch.randn(3, *shape[1:], generator=g)
        up = torch.randn(shape[0], 3, *([1, 1] if len(shape) == 4 else []), generator=g)
        tensors[name + suffix[0]] = down
        tensors[name + suffix[1]] = up
        expected[ours + ".weight"] = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    lora = load_unet_lora(path, unet.config)
    assert lora.file_modules == {name: ours + ".weight" for name, ours in targets.items()}
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    merge_lora_file(unet, path, 0.5)
    _assert_merged_some(before, unet.state_dict(), expected, 0.5)


def _assert_merged_some(before: dict, after: dict, expected: dict, strength: float):
    for key, weight in before.items():
        if key in expected:
            torch.testing.assert_close(after[key], weight + strength * expected[key], rtol=1e-6, atol=1e-5)
        else:
            assert torch.equal(after[key], weight), key


def test_strength_zero_changes_nothing(tmp_path, unet):
    path = tmp_path / "kohya.safetensors"
    write_kohya_lora(path, unet, rank=4, alpha=4.0, seed=3)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    merge_lora_file(unet, path, 0.0)
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_half_precision_weights_merge_in_float32(tmp_path, unet):
    path = tmp_path / "kohya.safetensors"
    expected = write_kohya_lora(path, unet, rank=4, alpha=2.0, seed=4)
    unet = unet.to(torch.bfloat16)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    merge_lora_file(unet, path, 1.0)
    after = unet.state_dict()
    for key, delta in expected.items():
        assert torch.equal(after[key], (before[key].float() + delta).to(torch.bfloat16)), key


def test_unmatched_keys_are_reported_in_one_warning_line(tmp_path, unet, caplog):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "kohya.safetensors"
    write_kohya_lora(path, unet, rank=4, alpha=2.0, seed=5, text_encoder_keys=False)
    tensors = load_file(str(path))
    tensors["lora_unet_down_blocks_0_motion_modules_0_to_q.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_down_blocks_0_motion_modules_0_to_q.lora_up.weight"] = torch.zeros(8, 4)
    save_file(tensors, str(path))
    with caplog.at_level(logging.WARNING, logger="xportrait"):
        lora = load_unet_lora(path, unet.config)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "kohya.safetensors: 2 LoRA keys match no weight" in warnings[0].getMessage()
    assert "lora_unet_down_blocks_0_motion_modules_0_to_q" in warnings[0].getMessage()
    assert len(lora.unmatched) == 2 and len(lora.factors) > 250


def test_a_file_matching_nothing_is_refused_by_name(tmp_path, unet):
    from safetensors.torch import save_file

    path = tmp_path / "not_a_lora.safetensors"
    save_file({"model.diffusion_model.foo.weight": torch.zeros(2, 2),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(LoraError, match=r"not_a_lora\.safetensors: not an SD1\.5 UNet LoRA"):
        load_unet_lora(path, unet.config)
    only_text = tmp_path / "text_only.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2)}, str(only_text))
    with pytest.raises(LoraError, match="only text-encoder keys"):
        load_unet_lora(only_text, unet.config)


def test_a_lora_of_another_unet_size_is_refused(tmp_path, unet):
    from safetensors.torch import save_file

    # An SDXL-sized attention LoRA on a name the SD1.5 layout also has.
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "sdxl.safetensors"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 640), f"{key}.lora_up.weight": torch.zeros(640, 4)},
              str(path))
    with pytest.raises(LoraError, match="sdxl.safetensors: .*do not fit the UNet weight.*SD1.5 LoRA is needed"):
        load_unet_lora(path, unet.config)


def test_an_incomplete_lora_is_refused(tmp_path, unet):
    from safetensors.torch import save_file

    path = tmp_path / "half.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(LoraError, match="half.safetensors: .*has no up matrix"):
        load_unet_lora(path, unet.config)


class _NotATensor:
    pass


def test_files_needing_code_to_unpickle_are_refused(tmp_path, unet):
    path = tmp_path / "evil.pt"
    torch.save({"lora_unet_conv_in.lora_down.weight": _NotATensor()}, str(path))
    with pytest.raises(LoraError, match="evil.pt: cannot be read .* code to unpickle are refused"):
        load_unet_lora(path, unet.config)
    with pytest.raises(LoraError, match="not found"):
        load_unet_lora(tmp_path / "missing.safetensors", unet.config)
    (tmp_path / "lora.txt").write_text("x")
    with pytest.raises(LoraError, match="not a LoRA file"):
        load_unet_lora(tmp_path / "lora.txt", unet.config)


def test_cli_lora_argument_parses_file_and_strength(tmp_path):
    from xportrait_core import cli

    path = tmp_path / "a:b.safetensors"  # a colon in the name stays part of it
    path.write_bytes(b"")
    argv = ["demo", "--lora", str(path), "--lora", f"{path}:0.25", "--lora", f"{path}:-1"]
    args = cli.build_parser().parse_args(argv)
    assert args.lora == [(str(path), 1.0), (str(path), 0.25), (str(path), -1.0)]
    assert (args.sampler, args.steps, args.guidance) == ("ddim", 30, 5.0)
    args = cli.build_parser().parse_args(["demo", "--sampler", "lcm"])
    assert (args.sampler, args.steps, args.guidance, args.lora) == ("lcm", 6, 1.5, [])
    args = cli.build_parser().parse_args(["demo", "--sampler", "lcm", "--steps", "4", "--guidance", "1"])
    assert (args.steps, args.guidance) == (4, 1.0)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--lora", str(tmp_path / "missing.safetensors:0.5")])


def test_cli_lora_gives_the_same_merged_weights_and_runs_lcm(tmp_path, tiny_model, golden_state_dict_path,
                                                             source_image_path, driving_video_path, monkeypatch):
    from xportrait_core import cli
    from xportrait_core.sampling import pipeline

    kohya, peft = tmp_path / "kohya.safetensors", tmp_path / "peft.safetensors"
    expected_kohya = write_kohya_lora(kohya, tiny_model.unet, rank=4, alpha=2.0, seed=6)
    expected_peft = write_diffusers_lora(peft, tiny_model.unet, rank=2, seed=7)
    seen = {}
    real = pipeline.animate_latents

    def recording(model, *args, **kwargs):
        seen["unet"] = {k: v.clone() for k, v in model.unet.state_dict().items()}
        seen["sampler"], seen["steps"] = kwargs["sampler"], kwargs["steps"]
        return real(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "animate_latents", recording)
    out = tmp_path / "demo.mp4"
    code = cli.main(["demo", "-o", str(out), "--weights", str(golden_state_dict_path), "--quiet",
                     "--reference", str(source_image_path), "--driving", str(driving_video_path),
                     "--frames", "2", "--decode-chunk", "2", "--sampler", "lcm", "--steps", "2",
                     "--lora", f"{kohya}:0.6", "--lora", str(peft)])
    assert code == 0 and out.is_file()
    assert (seen["sampler"], seen["steps"]) == ("lcm", 2)
    original = tiny_model.unet.state_dict()
    for key, weight in original.items():
        expected = weight + 0.6 * expected_kohya.get(key, 0) + expected_peft.get(key, 0)
        torch.testing.assert_close(seen["unet"][key], expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(seen["unet"]["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"],
                           original["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"])


def test_cli_refuses_a_file_that_is_not_a_lora(tmp_path, golden_state_dict_path, source_image_path,
                                               driving_video_path, capsys):
    from safetensors.torch import save_file

    from xportrait_core import cli

    path = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2)}, str(path))
    code = cli.main(["demo", "-o", str(tmp_path / "o.mp4"), "--weights", str(golden_state_dict_path), "--quiet",
                     "--reference", str(source_image_path), "--driving", str(driving_video_path),
                     "--frames", "2", "--steps", "1", "--lora", str(path)])
    assert code == 2
    assert "vae.safetensors: not an SD1.5 UNet LoRA" in capsys.readouterr().err
