"""CLIP text encoder against Hugging Face's CLIPTextModel, via a fixture made by tests/fixtures/make_clip_fixture.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xportrait_core.model.config import TextEncoderConfig, XPortraitConfig
from xportrait_core.model.text_encoder import CLIPTextEncoder, empty_prompt_tokens, encode_empty_prompt

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "clip_text_tiny.safetensors"


@pytest.fixture(scope="module")
def fixture():
    return load_file(str(FIXTURE))


@pytest.fixture(scope="module")
def tiny_encoder(fixture) -> CLIPTextEncoder:
    config = XPortraitConfig.tiny().text_encoder
    state = {k[len("weight."):]: v for k, v in fixture.items() if k.startswith("weight.")}
    # Only the kept rows of the token table are non-zero in the HF model the fixture came from.
    table = torch.zeros(config.vocab_size, config.width)
    table[fixture["token_ids"]] = fixture["token_rows"]
    state["embeddings.token_embedding.weight"] = table
    encoder = CLIPTextEncoder(config).eval()
    encoder.load_state_dict(state, strict=True)
    return encoder


def test_empty_prompt_tokens_match_the_clip_tokenizer(fixture):
    tokens = empty_prompt_tokens(TextEncoderConfig())
    assert tokens.dtype == torch.long and tokens.shape == (1, 77)
    assert tokens[0, 0].item() == 49406 and tokens[0, 1:].eq(49407).all()
    assert torch.equal(tokens, fixture["empty_tokens"])


@pytest.mark.parametrize("case", ["empty", "random", "short"])
@torch.no_grad()
def test_matches_hf_clip_text_model(tiny_encoder, fixture, case):
    hidden = tiny_encoder(fixture[f"{case}_tokens"])
    expected = fixture[f"{case}_hidden"]
    assert hidden.shape == expected.shape
    assert (hidden - expected).abs().max().item() <= 1e-5


def test_encode_empty_prompt(tiny_encoder, fixture):
    out = encode_empty_prompt(tiny_encoder)
    assert out.shape == (1, 77, 32)
    assert (out - fixture["empty_hidden"]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_attention_is_causal(tiny_encoder, fixture):
    # Changing a later token must leave every earlier position untouched, and change the later ones.
    tokens = fixture["random_tokens"][:1].clone()
    changed = tokens.clone()
    changed[0, 40] = 49406 if tokens[0, 40] != 49406 else 49407
    a, b = tiny_encoder(tokens), tiny_encoder(changed)
    assert torch.equal(a[:, :40], b[:, :40])
    assert (a[:, 40:] - b[:, 40:]).abs().amax(dim=-1).gt(1e-3).all()


def test_bad_tokens_are_refused(tiny_encoder):
    with pytest.raises(ValueError, match="token ids"):
        tiny_encoder(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        tiny_encoder(torch.zeros(77, dtype=torch.long))


def test_full_size_is_clip_vit_l14_text_model():
    with torch.device("meta"):
        encoder = CLIPTextEncoder(TextEncoderConfig())
    state = encoder.state_dict()
    assert sum(t.numel() for t in state.values()) == 123_060_480
    assert list(encoder.buffers()) == []  # no position_ids buffer: checkpoints' copy is ignored by the loader

    expected = {
        "embeddings.token_embedding.weight": (49408, 768),
        "embeddings.position_embedding.weight": (77, 768),
        "final_layer_norm.weight": (768,),
        "final_layer_norm.bias": (768,),
    }
    for i in range(12):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            expected[f"{layer}self_attn.{proj}.weight"] = (768, 768)
            expected[f"{layer}self_attn.{proj}.bias"] = (768,)
        for norm in ("layer_norm1", "layer_norm2"):
            expected[f"{layer}{norm}.weight"] = (768,)
            expected[f"{layer}{norm}.bias"] = (768,)
        expected[f"{layer}mlp.fc1.weight"] = (3072, 768)
        expected[f"{layer}mlp.fc1.bias"] = (3072,)
        expected[f"{layer}mlp.fc2.weight"] = (768, 3072)
        expected[f"{layer}mlp.fc2.bias"] = (768,)
    assert {name: tuple(t.shape) for name, t in state.items()} == expected
