"""The core's VideoDenoiser (what ComfyUI's KSampler calls through nodes/native): branches, windows, offsets."""
from __future__ import annotations

import pytest
import torch

from xportrait_core.sampling.video_denoiser import BranchInput, VideoDenoiser
from graph_stand_ins import EagerGraphs
from video_inputs import video_inputs

FRAMES = 6


@pytest.fixture(scope="module")
def inputs(tiny_model):
    return video_inputs(tiny_model, FRAMES, seed=0)


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


def test_windows_replayed_from_graphs_give_the_eager_eps(tiny_model, inputs, monkeypatch):
    """KSampler's path with CUDA graphs (fast.cuda_graphs.WindowGraphs): both branches in one batch, and the
    conditional branch alone (cfg 1), give what the eager windows give; the graphs go when the run ends."""
    from xportrait_core.fast import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "GuidanceGraphs", EagerGraphs)
    monkeypatch.setattr(cuda_graphs, "MIN_GRAPHED_STEPS", 2)  # this two-step run records (no kept graphs here)
    EagerGraphs.made.clear()
    cond = BranchInput(inputs["x"], True, inputs["context"])
    uncond = BranchInput(inputs["x"].clone(), False, inputs["uncond_context"])
    eager = _denoiser(tiny_model, inputs)
    graphed = VideoDenoiser(tiny_model, inputs["reference"], global_hint=inputs["global_hint"],
                            local_hint=inputs["local_hint"], global_strength=1.0, local_strength=0.5, overlap=4,
                            seed=5, timesteps=[500, 400], cuda_graphs=True)
    for t in (500, 400):
        for a, b in zip(eager(t, [cond, uncond], same_latents=True), graphed(t, [cond, uncond], same_latents=True)):
            assert (a - b).abs().max() < 1e-5
    alone = graphed(300, [cond])[0]  # both denoisers have drawn the same offsets so far
    assert (alone - eager(300, [cond])[0]).abs().max() < 1e-5
    kinds = [g.window_eps.__name__ for g in EagerGraphs.made]
    assert kinds == ["window_eps", "eps_cond"] and all(g.calls > 0 for g in EagerGraphs.made)
    graphed.release()
    assert all(g.released for g in EagerGraphs.made)


def test_a_failed_recording_warns_once_and_the_run_goes_on_eagerly(tiny_model, inputs, monkeypatch, caplog):
    from xportrait_core.fast import cuda_graphs

    class Failing(EagerGraphs):
        def eps(self, *args, **kwargs):
            self.calls += 1
            raise cuda_graphs.GraphCaptureError("RuntimeError: operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "GuidanceGraphs", Failing)
    EagerGraphs.made.clear()
    cond = BranchInput(inputs["x"], True, inputs["context"])
    uncond = BranchInput(inputs["x"].clone(), False, inputs["uncond_context"])
    graphed = VideoDenoiser(tiny_model, inputs["reference"], global_hint=inputs["global_hint"],
                            local_hint=inputs["local_hint"], global_strength=1.0, local_strength=0.5, overlap=4,
                            seed=5, cuda_graphs=True)
    with caplog.at_level("WARNING", logger="xportrait"):
        first = graphed(500, [cond, uncond], same_latents=True)
        graphed(400, [cond, uncond], same_latents=True)
    expected = _denoiser(tiny_model, inputs)(500, [cond, uncond], same_latents=True)
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(first, expected))
    warnings = [r.getMessage() for r in caplog.records if "CUDA graph recording failed" in r.getMessage()]
    assert len(warnings) == 1 and "sampling continues without graphs" in warnings[0]
    assert sum(g.calls for g in EagerGraphs.made) == 1  # not tried again after the failure
