"""fp8 weight storage (model/weight_storage.py): which parameters are held narrow, that the networks then compute
exactly what fp8-rounded weights give, and how far that is from the float32 model (tiny golden weights, CPU)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from xportrait_core.fast.compilation import use_channels_last
from xportrait_core.model.checkpoint import CheckpointError, load_xportrait
from xportrait_core.model.config import XPortraitConfig
from xportrait_core.model.operations import CastingConv2d, CastingLinear, casting_operations, torch_operations
from xportrait_core.model.weight_storage import STORED_NETWORKS, stored_parameter_names, store_weights
from xportrait_core.model.xportrait import XPortrait

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@pytest.fixture(scope="module")
def official_state(golden_state_dict_path):
    return load_file(str(golden_state_dict_path))


@pytest.fixture(scope="module", params=FP8, ids=["e4m3fn", "e5m2"])
def stored(request, official_state):
    model = load_xportrait(official_state, XPortraitConfig.tiny(), operations=casting_operations(),
                           storage_dtype=request.param)
    return request.param, model


@torch.no_grad()
def _eps(model, cases):
    bank = model.reference_bank(cases["reference_latent"][:1], 500, cases["context"])
    cond = model.eps_cond(cases["x_noisy"], cases["timesteps"], cases["context"], bank, cases["global_hint"],
                          cases["local_hint"])
    uncond = model.eps_uncond(cases["x_noisy"], cases["timesteps"], cases["uncond_context"])
    return cond, uncond


def _relative_rms(a, b):
    return float((a - b).norm() / b.norm())


def test_linear_and_conv_weights_of_the_diffusion_networks_are_stored_narrow(stored):
    dtype, model = stored
    names = stored_parameter_names(model)
    params = dict(model.named_parameters())
    assert model.storage_dtype == dtype and model.dtype == torch.float32
    # Every Linear/Conv2d weight and bias of the four networks, nothing else.
    for name, p in params.items():
        network = name.split(".")[0]
        layer = model.get_submodule(name.rsplit(".", 1)[0])
        narrow = network in STORED_NETWORKS and isinstance(layer, (CastingLinear, CastingConv2d))
        assert (name in names) == narrow, name
        assert p.dtype == (dtype if narrow else torch.float32), name
    # Norms, the VAE and the positional-encoding buffers stay in the compute dtype.
    assert model.unet.out[0].weight.dtype == torch.float32
    assert model.global_control.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.vae.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers())
    # The narrow weights are most of the diffusion networks' bytes: about a quarter of float32's in all.
    full = sum(p.numel() * 4 for n, p in params.items() if n.split(".")[0] in STORED_NETWORKS)
    held = sum(p.numel() * p.element_size() for n, p in params.items() if n.split(".")[0] in STORED_NETWORKS)
    assert len(names) > 500 and held < 0.3 * full


def test_fp8_storage_computes_what_fp8_rounded_weights_give(stored, official_state, golden_cases):
    """The casting layers lose nothing beyond the rounding of the weights to fp8: a float32 model whose stored
    weights were rounded to fp8 and back gives the same eps (float32 rounding)."""
    dtype, model = stored
    rounded = load_xportrait(official_state, XPortraitConfig.tiny())
    names = stored_parameter_names(rounded)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name in names:
                p.copy_(p.to(dtype).float())
    for ours, expected in zip(_eps(model, golden_cases), _eps(rounded, golden_cases)):
        assert float((ours - expected).abs().max()) < 1e-5


# Relative RMS error of eps against the float32 model (tiny golden weights, t=500): measured 0.06 / 0.08 (cond /
# uncond) for e4m3fn and 0.12 / 0.17 for e5m2 (two mantissa bits fewer); bounded with room, and from below so a
# storage that silently stayed float32 fails.
BOUNDS = {torch.float8_e4m3fn: (0.01, 0.15), torch.float8_e5m2: (0.03, 0.3)}


def test_fp8_eps_stays_within_the_stated_tolerance_of_float32(stored, tiny_model, golden_cases):
    dtype, model = stored
    low, high = BOUNDS[dtype]
    for ours, full in zip(_eps(model, golden_cases), _eps(tiny_model, golden_cases)):
        assert torch.isfinite(ours).all()
        assert low < _relative_rms(ours, full) < high


def test_fp8_storage_runs_in_channels_last_memory(stored, golden_cases):
    """The channels-last preparation (as the Load node does for a GPU) keeps the fp8 weights and the result (up to
    the convolutions' float32 sums in another order: measured 1e-4 of eps's scale at most, for e5m2)."""
    dtype, model = stored
    before = _eps(model, golden_cases)
    use_channels_last(model)
    try:
        conv = model.unet.input_blocks[0][0].weight
        assert conv.dtype == dtype and conv.is_contiguous(memory_format=torch.channels_last)
        for a, b in zip(_eps(model, golden_cases), before):
            assert float((a - b).abs().max()) < 1e-3 * float(b.abs().max())
    finally:
        for name in STORED_NETWORKS + ("vae",):
            getattr(model, name).to(memory_format=torch.contiguous_format)
        model.memory_format = torch.contiguous_format


def test_store_weights_on_a_built_model_matches_loading_narrow(official_state, golden_cases):
    model = load_xportrait(official_state, XPortraitConfig.tiny(), operations=casting_operations())
    store_weights(model, torch.float8_e4m3fn)
    loaded = load_xportrait(official_state, XPortraitConfig.tiny(), operations=casting_operations(),
                            storage_dtype=torch.float8_e4m3fn)
    assert model.storage_dtype == torch.float8_e4m3fn
    for a, b in zip(_eps(model, golden_cases), _eps(loaded, golden_cases)):
        assert torch.equal(a, b)


def test_fp8_storage_needs_casting_layers(official_state):
    with pytest.raises(ValueError, match="need layers that cast them at every call"):
        load_xportrait(official_state, XPortraitConfig.tiny(), storage_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="need layers that cast them at every call"):
        store_weights(XPortrait(XPortraitConfig.tiny(), with_text_encoder=False, operations=torch_operations()),
                      torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="not float16"):
        load_xportrait(official_state, XPortraitConfig.tiny(), operations=casting_operations(),
                       storage_dtype=torch.float16)


def test_the_key_check_still_names_a_missing_key(official_state):
    state = dict(official_state)
    del state["pose_control_model.zero_convs.3.0.weight"]
    with pytest.raises(CheckpointError) as err:
        load_xportrait(state, XPortraitConfig.tiny(), operations=casting_operations(),
                       storage_dtype=torch.float8_e4m3fn)
    assert str(err.value) == ("state dict does not fit X-Portrait: 1 key missing "
                              "(e.g. pose_control_model.zero_convs.3.0.weight)")


@torch.no_grad()
def test_casting_layers_cast_weights_to_the_input():
    torch.manual_seed(0)
    linear, conv = CastingLinear(8, 4), CastingConv2d(3, 5, 3, padding=1)
    x, image = torch.randn(2, 8), torch.randn(1, 3, 6, 6)
    expected = linear(x), conv(image)
    for layer in (linear, conv):
        layer.to(torch.float8_e4m3fn)
    assert linear.weight.dtype == torch.float8_e4m3fn
    for out, full, source in zip((linear(x), conv(image)), expected, (linear, conv)):
        assert out.dtype == torch.float32
        assert 0 < float((out - full).abs().max()) < 0.1 * float(full.abs().max())
        # And exactly what the rounded weights give.
        rounded = torch.nn.functional.linear(x, linear.weight.float(), linear.bias.float()) if source is linear \
            else torch.nn.functional.conv2d(image, conv.weight.float(), conv.bias.float(), padding=1)
        assert torch.allclose(out, rounded, atol=1e-6)
