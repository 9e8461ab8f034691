"""The VAE against the official `first_stage_model`: golden outputs at tiny size, checkpoint key layout at full size."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_path
from xportrait_core.model.config import VAEConfig, XPortraitConfig
from xportrait_core.model.vae import AutoencoderKL

PREFIX = "first_stage_model."


@pytest.fixture(scope="module")
def tiny_vae(golden_state_dict_path) -> AutoencoderKL:
    official = load_file(str(golden_state_dict_path))
    state = {k[len(PREFIX):]: v.float() for k, v in official.items() if k.startswith(PREFIX)}
    vae = AutoencoderKL(XPortraitConfig.tiny().vae).eval()
    vae.load_state_dict(state, strict=True)  # strict: every official key, and nothing else
    return vae


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@torch.no_grad()
def test_encode_matches_official_posterior(tiny_vae, golden_cases):
    mean, logvar = tiny_vae.encode(golden_cases["vae_image"])
    assert _max_err(mean, golden_cases["vae_posterior_mean"]) <= 1e-4
    assert _max_err(logvar, golden_cases["vae_posterior_logvar"]) <= 1e-4


@torch.no_grad()
def test_decode_matches_official(tiny_vae, golden_cases):
    # The official decode_first_stage divides by the scale factor itself; ours leaves that to the caller.
    decoded = tiny_vae.decode(golden_cases["vae_latent"] / VAEConfig().scale_factor)
    assert _max_err(decoded, golden_cases["vae_decoded"]) <= 1e-4


@torch.no_grad()
def test_logvar_is_clamped_like_the_official_posterior(tiny_vae):
    # Push quant_conv's logvar half far outside [-30, 20] in both directions.
    vae = AutoencoderKL(XPortraitConfig.tiny().vae).eval()
    vae.load_state_dict(tiny_vae.state_dict())
    z = vae.config.z_channels
    vae.quant_conv.bias[z:z + 2] = torch.tensor([1e3, -1e3])
    _, logvar = vae.encode(torch.zeros(1, 3, 64, 64))
    assert logvar[:, 0].eq(20.0).all() and logvar[:, 1].eq(-30.0).all()


@torch.no_grad()
def test_chunked_equals_unchunked(tiny_vae):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 64, 64, generator=gen) * 2 - 1
    mean, logvar = tiny_vae.encode(images)
    mean_c, logvar_c = tiny_vae.encode_chunked(images, chunk=2)
    assert _max_err(mean_c, mean) <= 1e-5 and _max_err(logvar_c, logvar) <= 1e-5

    latents = torch.randn(5, 4, 8, 8, generator=gen)
    decoded = tiny_vae.decode(latents)
    assert _max_err(tiny_vae.decode_chunked(latents, chunk=2), decoded) <= 1e-5
    assert _max_err(tiny_vae.decode_chunked(latents, chunk=16), decoded) <= 1e-5


def test_bad_inputs_are_refused(tiny_vae):
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny_vae.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="images"):
        tiny_vae.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match="latents"):
        tiny_vae.decode(torch.zeros(1, 8, 8, 8))
    with pytest.raises(ValueError, match="chunk"):
        tiny_vae.decode_chunked(torch.zeros(1, 4, 8, 8), chunk=0)


def test_full_size_keys_and_shapes_match_the_official_checkpoint():
    expected = {}
    for line in golden_path("official_full_size_keys.tsv").read_text().splitlines():
        name, shape = line.split("\t")[:2]
        if name.startswith(PREFIX):
            expected[name[len(PREFIX):]] = shape
    assert len(expected) == 248
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
    ours = {name: str(tuple(t.shape)) for name, t in vae.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == [], "missing"
    assert sorted(set(ours) - set(expected)) == [], "unexpected"
    assert {n: s for n, s in ours.items() if expected[n] != s} == {}
