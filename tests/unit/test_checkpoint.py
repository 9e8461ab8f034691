"""Checkpoint reading: formats, key reports, refusal of what does not fit, dtype choice, conversion."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from xportrait_core.model.checkpoint import CheckpointError, convert_checkpoint, load_xportrait, read_state_dict
from xportrait_core.model.config import XPortraitConfig
from xportrait_core.model.xportrait import MissingTextEncoderError
from xportrait_core.model.text_encoder import CLIPTextEncoder, encode_empty_prompt


@pytest.fixture(scope="module")
def official_state(golden_state_dict_path):
    return load_file(str(golden_state_dict_path))


@torch.no_grad()
def _uncond(model, cases):
    return model.eps_uncond(cases["x_noisy"], 500, cases["uncond_context"])


def test_th_with_state_dict_wrapper_loads_like_safetensors(tmp_path, official_state, tiny_model, golden_cases):
    path = tmp_path / "model_state-415001.th"
    torch.save({"state_dict": official_state, "global_step": torch.tensor(415001)}, path)
    model = load_xportrait(path)
    assert model.config == XPortraitConfig.tiny()  # inferred from shapes
    assert torch.equal(_uncond(model, golden_cases), _uncond(tiny_model, golden_cases))


class _Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    message = str(err.value)
    assert message.startswith("evil.ckpt holds Python objects besides the weights") and "refused" in message
    assert "weights_only" not in message and "python -m xportrait_core convert" in message  # no hint to run code


def test_a_truncated_th_says_download_again_without_torch_paragraphs(tmp_path, official_state):
    path = tmp_path / "model_state-415001.th"
    torch.save(official_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    message = str(err.value)
    assert message.startswith("model_state-415001.th is incomplete or damaged") and "download it again" in message
    assert "miniz" not in message and "central directory" not in message and len(message) < 200


def test_a_renamed_safetensors_file_loads_as_safetensors(tmp_path, golden_state_dict_path, official_state):
    path = tmp_path / "model_state-415001.th"
    path.write_bytes(golden_state_dict_path.read_bytes())
    state = read_state_dict(path)
    assert state.keys() == official_state.keys()
    assert all(torch.equal(state[k], official_state[k]) for k in state)


def test_a_torch_file_named_safetensors_is_called_what_it_is(tmp_path, official_state):
    path = tmp_path / "model.safetensors"
    torch.save(official_state, path)
    with pytest.raises(CheckpointError, match="model.safetensors is not a safetensors file"):
        read_state_dict(path)


def test_extra_keys_are_ignored_with_one_warning_line(official_state, golden_cases, tiny_model, caplog):
    state = dict(official_state)
    state["model_ema.decay"] = torch.tensor(0.999)  # ignored silently, as before (an official training buffer)
    state["optimizer.state.0.exp_avg"] = torch.zeros(3)
    state["model.diffusion_model.extra_head.weight"] = torch.zeros(3)
    warnings = []
    with caplog.at_level("WARNING", logger="xportrait"):
        model = load_xportrait(state, warnings=warnings)
    assert warnings == ["2 extra keys in the checkpoint are not part of X-Portrait and were ignored (e.g. "
                        "optimizer.state.0.exp_avg)"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"X-Portrait: state dict: {warnings[0]}"]
    assert torch.equal(_uncond(model, golden_cases), _uncond(tiny_model, golden_cases))


def test_a_missing_key_is_refused_naming_it(official_state):
    state = dict(official_state)
    del state["pose_control_model.zero_convs.3.0.weight"]
    with pytest.raises(CheckpointError) as err:
        load_xportrait(state, XPortraitConfig.tiny())
    assert str(err.value) == ("state dict does not fit X-Portrait: 1 key missing "
                              "(e.g. pose_control_model.zero_convs.3.0.weight)")


@pytest.mark.parametrize("suffix", [".txt", ".bin"])
def test_wrong_file_type_is_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint file"):
        read_state_dict(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere.safetensors"):
        load_xportrait(tmp_path / "nowhere.safetensors")


def test_missing_and_misshaped_keys_are_counted_with_one_example(official_state):
    state = dict(official_state)
    del state["pose_control_model.zero_convs.3.0.weight"]
    state["model.diffusion_model.extra_head.weight"] = torch.zeros(3)
    state["local_pose_control_model.middle_block_out.0.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as err:
        load_xportrait(state, XPortraitConfig.tiny())
    message = str(err.value)
    # Named as the file names them, so the user can find them.
    assert "1 key missing (e.g. pose_control_model.zero_convs.3.0.weight)" in message
    assert "1 key with the wrong shape (e.g. local_pose_control_model.middle_block_out.0.bias (7,) != (64,))" in message
    assert "extra_head" not in message  # extra keys are not a reason to refuse


def test_unknown_model_is_refused_with_a_short_report():
    not_xportrait = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}
    with pytest.raises(CheckpointError, match="not an X-Portrait checkpoint of a known size") as err:
        load_xportrait(not_xportrait)
    message = str(err.value)
    assert message.count("(e.g. ") <= 2 and len(message) < 400, message


def test_other_schedule_is_refused(official_state):
    state = dict(official_state)
    state["alphas_cumprod"] = state["alphas_cumprod"] * 0.5
    with pytest.raises(CheckpointError, match="noise schedule"):
        load_xportrait(state)


def _tiny_clip_keys():
    encoder = CLIPTextEncoder(XPortraitConfig.tiny().text_encoder)
    torch.manual_seed(0)
    for p in encoder.parameters():
        p.data.normal_(0, 0.02)
    keys = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in encoder.state_dict().items()}
    keys["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return encoder, keys


def test_clip_weights_become_the_text_encoder(official_state):
    encoder, clip_keys = _tiny_clip_keys()
    model = load_xportrait({**official_state, **clip_keys})
    assert model.text_encoder is not None
    assert torch.allclose(model.empty_prompt_context(), encode_empty_prompt(encoder), atol=1e-6)


def test_partial_clip_weights_are_refused(official_state):
    _, clip_keys = _tiny_clip_keys()
    dropped = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    clip_keys.pop(dropped)
    with pytest.raises(CheckpointError, match="1 key missing .e.g. cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        load_xportrait({**official_state, **clip_keys})


def test_without_clip_the_empty_prompt_is_a_clear_error(tiny_model):
    with pytest.raises(MissingTextEncoderError, match="no CLIP text encoder"):
        tiny_model.empty_prompt_context()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_caller_chooses_dtype(official_state, golden_cases, dtype):
    model = load_xportrait(official_state, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    eps = _uncond(model, golden_cases)
    assert eps.dtype == torch.float32
    # Half-precision weights and activations stay close to the float32 reference on these small magnitudes.
    assert (eps - golden_cases["eps_uncond"]).abs().max() < 0.05


def test_convert_to_safetensors_round_trip(tmp_path, official_state, tiny_model, golden_cases):
    source = tmp_path / "model_state.th"
    torch.save(official_state, source)
    destination = tmp_path / "xportrait.safetensors"
    report = convert_checkpoint(source, destination, dtype=torch.float16)
    assert report.fits and len(report.ignored) == 16 + 13
    with safe_open(str(destination), "pt") as f:
        assert f.metadata()["format"] == "xportrait-core" and f.metadata()["config"] == "tiny"
        assert all(k.startswith(("unet.", "reference_net.", "global_control.", "local_control.", "vae.")) for k in f.keys())
    converted = load_xportrait(destination)
    # The golden weights are float16-representable, so float16 conversion is lossless.
    assert torch.equal(_uncond(converted, golden_cases), _uncond(tiny_model, golden_cases))
