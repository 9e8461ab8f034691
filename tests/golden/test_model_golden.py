"""The model loads the official checkpoint format and computes what the official code computes (golden fixtures
made by running bytedance/X-Portrait at tiny size; see ../shared/golden/README.md)."""
from __future__ import annotations

import torch

from conftest import golden_path
from xportrait_core.model.checkpoint import to_our_keys, compare_keys, expected_shapes
from xportrait_core.model.config import XPortraitConfig

TOL = 1e-4


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def test_eps_cond_matches_official(tiny_model, golden_cases):
    c = golden_cases
    # The fixture repeats one reference latent per frame; the bank is computed per frame because the fixture's
    # stand-in contexts differ per frame.
    bank = tiny_model.reference_bank(c["reference_latent"][:1], c["timesteps"][0], c["context"])
    eps = tiny_model.eps_cond(c["x_noisy"], c["timesteps"], c["context"], bank, c["global_hint"], c["local_hint"])
    assert eps.shape == c["eps_cond"].shape
    assert _max_err(eps, c["eps_cond"]) < TOL


@torch.no_grad()
def test_eps_cond_multi_reference_matches_official(tiny_model, golden_cases):
    c = golden_cases
    references = torch.cat([c["reference_latent"][:1], c["more_reference_latents"][:, 0]])
    bank = tiny_model.reference_bank(references, c["timesteps"][0], c["context"])
    eps = tiny_model.eps_cond(c["x_noisy"], c["timesteps"], c["context"], bank, c["global_hint"], c["local_hint"])
    assert _max_err(eps, c["eps_cond_multi_reference"]) < TOL
    # The extra references must matter: the single-reference output is measurably different.
    assert _max_err(eps, c["eps_cond"]) > 1e-3


@torch.no_grad()
def test_eps_uncond_matches_official(tiny_model, golden_cases):
    c = golden_cases
    eps = tiny_model.eps_uncond(c["x_noisy"], c["timesteps"], c["uncond_context"])
    assert _max_err(eps, c["eps_uncond"]) < TOL


@torch.no_grad()
def test_shared_context_bank_equals_per_frame_bank(tiny_model, golden_cases):
    """With one context for every frame, the batch-1 reference net gives the same eps as running it per frame."""
    c = golden_cases
    context = c["context"][:1]
    shared = tiny_model.reference_bank(c["reference_latent"][:1], 500, context)
    per_frame = tiny_model.reference_bank(c["reference_latent"][:1], 500, context.expand(16, -1, -1))
    assert shared.entries[0].shape[0] == 1 and per_frame.entries[0].shape[0] == 16
    a = tiny_model.eps_cond(c["x_noisy"], 500, context, shared, c["global_hint"], c["local_hint"])
    b = tiny_model.eps_cond(c["x_noisy"], 500, context, per_frame, c["global_hint"], c["local_hint"])
    assert _max_err(a, b) < 1e-5


@torch.no_grad()
def test_zero_strength_equals_no_controlnet(tiny_model, golden_cases):
    c = golden_cases
    bank = tiny_model.reference_bank(c["reference_latent"][:1], 500, c["context"])
    args = (c["x_noisy"], c["timesteps"], c["context"], bank)
    full = tiny_model.eps_cond(*args, c["global_hint"], c["local_hint"])
    no_global = tiny_model.eps_cond(*args, None, c["local_hint"])
    no_local = tiny_model.eps_cond(*args, c["global_hint"], None)
    assert torch.equal(tiny_model.eps_cond(*args, c["global_hint"], c["local_hint"], global_strength=0.0), no_global)
    assert torch.equal(tiny_model.eps_cond(*args, c["global_hint"], c["local_hint"], local_strength=0.0), no_local)
    # Each control contributes, and strength scales it continuously.
    assert _max_err(full, no_global) > 1e-3 and _max_err(full, no_local) > 1e-3
    tiny = tiny_model.eps_cond(*args, c["global_hint"], c["local_hint"], global_strength=1e-4)
    assert _max_err(tiny, no_global) < 1e-4 * _max_err(full, no_global) * 10
    double = tiny_model.eps_cond(*args, c["global_hint"], c["local_hint"], global_strength=2.0)
    assert _max_err(double, full) > 1e-3


def test_full_size_official_keys_map_onto_official_config():
    """Every key of the released checkpoint (names and shapes from the official full-size model) has its place in
    `XPortraitConfig.official()`, and nothing of ours is left unloaded."""
    rows = [line.rstrip("\n").split("\t") for line in golden_path("official_full_size_keys.tsv").open()]
    assert len(rows) == 2885
    state = {name: torch.empty(eval(shape), device="meta") for name, shape, _ in rows}  # shape is a tuple literal
    ours, ignored = to_our_keys(state)
    report = compare_keys(ours, expected_shapes(XPortraitConfig.official(), with_text_encoder=False))
    assert report.fits, report.describe()
    # What is ignored is exactly the reference net's unused hint encoder and the schedule buffers.
    assert all(k.startswith("appearance_control_model.input_hint_block.") or "." not in k for k in ignored)
    assert len(ignored) == 16 + 13
    params = sum(t.numel() for k, t in state.items() if k not in ignored and "pos_encoder" not in k)
    assert abs(params / 1e9 - 2.94) < 0.01


@torch.no_grad()
def test_batched_guidance_pass_matches_both_official_branches(tiny_model, golden_cases):
    """One UNet pass over [cond rows | uncond rows]: the bank and the control reach only the conditional rows,
    so each half is the official branch's output (per-frame contexts that differ between the branches)."""
    c = golden_cases
    bank = tiny_model.reference_bank(c["reference_latent"][:1], c["timesteps"][0], c["context"])
    cond, uncond = tiny_model.eps_branches(c["x_noisy"], c["timesteps"], c["context"], c["uncond_context"], bank,
                                         c["global_hint"], c["local_hint"])
    assert _max_err(cond, c["eps_cond"]) < TOL
    assert _max_err(uncond, c["eps_uncond"]) < TOL


@torch.no_grad()
def test_batched_guidance_pass_with_one_shared_context(tiny_model, golden_cases):
    """With one context tensor for both branches it is passed once (batch 1); an equal copy goes per row. Either
    way the halves match separate calls."""
    c = golden_cases
    context = c["context"][:1]
    bank = tiny_model.reference_bank(c["reference_latent"][:1], 500, context)
    expected_cond = tiny_model.eps_cond(c["x_noisy"], 500, context, bank, c["global_hint"], None)
    expected_uncond = tiny_model.eps_uncond(c["x_noisy"], 500, context)
    for uncond_context in (context, context.clone()):
        cond, uncond = tiny_model.eps_branches(c["x_noisy"], 500, context, uncond_context, bank, c["global_hint"],
                                             None, local_strength=0.0)
        assert _max_err(cond, expected_cond) < 1e-5
        assert _max_err(uncond, expected_uncond) < 1e-5
        assert _max_err(cond, uncond) > 1e-3


@torch.no_grad()
def test_batched_guidance_pass_with_one_shared_per_frame_context(tiny_model, golden_cases):
    """One per-frame context tensor (F, 77, C) for both branches: each branch's rows get it (it was passed once,
    as if of batch 1, and the doubled batch could not take it)."""
    c = golden_cases
    context = c["context"]
    bank = tiny_model.reference_bank(c["reference_latent"][:1], 500, context)
    cond, uncond = tiny_model.eps_branches(c["x_noisy"], 500, context, context, bank, c["global_hint"], None,
                                         local_strength=0.0)
    assert _max_err(cond, tiny_model.eps_cond(c["x_noisy"], 500, context, bank, c["global_hint"], None)) < 1e-5
    assert _max_err(uncond, tiny_model.eps_uncond(c["x_noisy"], 500, context)) < 1e-5
