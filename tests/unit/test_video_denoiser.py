"""The core's VideoDenoiser (what ComfyUI's KSampler calls through nodes/native): branches, windows, offsets."""
from __future__ import annotations

import pytest
import torch

from xportrait_core.sampling.video_denoiser import BranchInput, VideoDenoiser

FRAMES = 6


@pytest.fixture(scope="module")
def inputs(tiny_model):
    g = torch.Generator().manual_seed(0)
    h = tiny_model.config.image_size // 8
    width = tiny_model.config.unet.context_dim
    return dict(
        x=torch.randn(FRAMES, 4, h, h, generator=g),
        reference=torch.randn(1, 4, h, h, generator=g),
        global_hint=torch.rand(FRAMES, 3, h * 8, h * 8, generator=g) * 2 - 1,
        local_hint=torch.rand(FRAMES, 3, h * 8, h * 8, generator=g) * 2 - 1,
        context=torch.randn(1, 77, width, generator=g),
        uncond_context=torch.randn(1, 77, width, generator=g),
    )


def _denoiser(model, data, seed=5, overlap=4):
    return VideoDenoiser(model, data["reference"], global_hint=data["global_hint"], local_hint=data["local_hint"],
                         global_strength=1.0, local_strength=0.5, overlap=overlap, seed=seed)


def test_both_branches_in_one_batch_equal_each_branch_alone(tiny_model, inputs):
    cond = BranchInput(inputs["x"], True, inputs["context"])
    uncond = BranchInput(inputs["x"].clone(), False, inputs["uncond_context"])
    together = _denoiser(tiny_model, inputs)(500, [uncond, cond])  # any order
    alone_cond = _denoiser(tiny_model, inputs)(500, [cond])[0]
    alone_uncond = _denoiser(tiny_model, inputs)(500, [uncond])[0]
    assert (together[1] - alone_cond).abs().max() < 1e-4
    assert (together[0] - alone_uncond).abs().max() < 1e-4
    assert (alone_cond - alone_uncond).abs().max() > 1e-2  # the branches differ: the comparison means something


def test_a_host_that_knows_the_latents_are_shared_skips_comparing_them(tiny_model, inputs, monkeypatch):
    cond = BranchInput(inputs["x"], True, inputs["context"])
    uncond = BranchInput(inputs["x"].clone(), False, inputs["uncond_context"])
    denoiser = _denoiser(tiny_model, inputs)
    compared = denoiser(500, [cond, uncond])
    equal = torch.equal
    calls = []
    monkeypatch.setattr(torch, "equal", lambda a, b: calls.append(a.dtype) or equal(a, b))
    told = denoiser(400, [cond, uncond], same_latents=True)
    # No latent (float) tensor is compared on the host (on CUDA, each comparison waits for the GPU); the frame
    # indices, int64 on the host, are.
    assert [dtype for dtype in calls if dtype.is_floating_point] == []
    # The same calls, comparing: the same window offsets drawn, the same eps.
    asking = _denoiser(tiny_model, inputs)
    asking(500, [cond, uncond])
    asked = asking(400, [cond, uncond])
    assert (told[0] - asked[0]).abs().max() < 1e-5 and (told[1] - asked[1]).abs().max() < 1e-5
    assert (compared[0] - told[0]).abs().max() > 1e-3  # another timestep: the run did something


def test_offsets_are_drawn_per_timestep_as_our_sampler_draws_them(tiny_model, inputs):
    denoiser = _denoiser(tiny_model, inputs, seed=9)
    offsets = [denoiser.window_offset(t, FRAMES) for t in (991, 991, 958, 925)]
    g = torch.Generator().manual_seed(9)
    drawn = [int(torch.randint(0, FRAMES, (1,), generator=g)) for _ in range(3)]
    assert offsets == [drawn[0], drawn[0], drawn[1], drawn[2]]
    assert _denoiser(tiny_model, inputs, overlap=0).window_offset(991, FRAMES) == 0  # overlap 0: frames in order


def test_a_window_cut_by_the_host_runs_as_given_with_its_frames_hints(tiny_model, inputs):
    frames = [4, 5, 0]
    x = inputs["x"][frames]
    denoiser = _denoiser(tiny_model, inputs)
    (eps,) = denoiser(300, [BranchInput(x, True, inputs["context"])], frame_indices=frames)
    bank = tiny_model.reference_bank(inputs["reference"], 300, inputs["context"])
    expected = tiny_model.eps_cond(x, 300, inputs["context"], bank, global_hint=inputs["global_hint"][frames],
                                   local_hint=inputs["local_hint"][frames], global_strength=1.0,
                                   local_strength=0.5)
    assert (eps - expected).abs().max() < 1e-4


def test_latents_of_another_length_than_the_motion_are_refused(tiny_model, inputs):
    with pytest.raises(ValueError, match="latents hold 5 frames but the motion has 6"):
        _denoiser(tiny_model, inputs)(500, [BranchInput(inputs["x"][:5], True, inputs["context"])])
