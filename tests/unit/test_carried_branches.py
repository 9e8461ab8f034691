"""A short run's banks and hint features handed to the next run of the same job (sampling/carried_branches.py)."""
from __future__ import annotations

import pytest
import torch

from xportrait_core.sampling.batched_banks import DEFAULT_CHUNK
from video_inputs import video_inputs
from xportrait_core.sampling.video_denoiser import BranchInput, VideoDenoiser

FRAMES = 6
TIMESTEPS = [999, 759, 499, 259]  # an LCM-like run: few planned timesteps, one bank chunk


@pytest.fixture(scope="module")
def inputs(tiny_model):
    data = video_inputs(tiny_model, FRAMES, seed=3)
    data["other_context"] = data.pop("uncond_context")
    return data


@pytest.fixture
def counted(tiny_model, monkeypatch):
    """Calls of the reference net (banks) and of the hint encoders during a test."""
    calls = {"banks": 0, "hints": 0}
    bank, hints = tiny_model.reference_bank, tiny_model.encode_motion_hints

    def counting_bank(*args, **kwargs):
        calls["banks"] += 1
        return bank(*args, **kwargs)

    def counting_hints(*args, **kwargs):
        calls["hints"] += 1
        return hints(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "reference_bank", counting_bank)
    monkeypatch.setattr(tiny_model, "encode_motion_hints", counting_hints)
    return calls


def _run(model, data, *, seed, carried=None, context_key="context", timesteps=TIMESTEPS, **options):
    """One conditional-only run (cfg 1) over the planned timesteps; (eps per step, the denoiser)."""
    denoiser = VideoDenoiser(model, data["reference"], global_hint=data["global_hint"], local_hint=data["local_hint"],
                             global_strength=1.0, local_strength=0.7, overlap=4, seed=seed, timesteps=timesteps,
                             carried=carried, **options)
    branch = BranchInput(data["x"], True, data[context_key])
    return [denoiser(t, [branch])[0] for t in timesteps], denoiser


def test_the_next_run_of_a_job_takes_the_banks_and_hints_and_gives_a_fresh_run_s_eps(tiny_model, inputs, counted):
    _, first = _run(tiny_model, inputs, seed=1)
    assert counted == {"banks": 1, "hints": 1}  # one batched reference-net call for the four timesteps
    carried = first.carry()
    assert carried is not None
    again, second = _run(tiny_model, inputs, seed=2, carried=carried)
    assert second.took_carried and counted == {"banks": 1, "hints": 1}  # nothing computed again
    fresh, _ = _run(tiny_model, inputs, seed=2)
    assert counted == {"banks": 2, "hints": 2}
    for a, b in zip(again, fresh):
        assert torch.equal(a, b)
    assert (again[0] - again[1]).abs().max() > 1e-3  # the steps differ: the comparison means something


def test_another_text_or_schedule_is_not_served_the_last_run_s_banks(tiny_model, inputs, counted):
    _, first = _run(tiny_model, inputs, seed=1)
    other_text, second = _run(tiny_model, inputs, seed=1, carried=first.carry(), context_key="other_context")
    assert not second.took_carried and counted["banks"] == 2
    fresh, _ = _run(tiny_model, inputs, seed=1, context_key="other_context")
    assert all(torch.equal(a, b) for a, b in zip(other_text, fresh))
    _, third = _run(tiny_model, inputs, seed=1, carried=second.carry(), context_key="other_context",
                    timesteps=[999, 499])
    assert not third.took_carried


def test_a_replaced_reference_net_weight_is_not_served_the_last_run_s_banks(tiny_model, inputs, counted):
    _, first = _run(tiny_model, inputs, seed=1)
    carried = first.carry()
    layer = tiny_model.reference_net.input_blocks[0][0]
    original = layer.weight
    # As a host's loader or patcher replaces a weight: another tensor in the slot (here with other values too).
    layer.weight = torch.nn.Parameter(original.detach() * 1.5, requires_grad=False)
    try:
        patched, second = _run(tiny_model, inputs, seed=1, carried=carried)
        assert not second.took_carried and counted["banks"] == 2
        fresh, _ = _run(tiny_model, inputs, seed=1)
        assert all(torch.equal(a, b) for a, b in zip(patched, fresh))
    finally:
        layer.weight = original


def test_a_long_run_carries_nothing(tiny_model, inputs):
    timesteps = list(range(999, 0, -1000 // (DEFAULT_CHUNK + 1)))[:DEFAULT_CHUNK + 1]
    denoiser = VideoDenoiser(tiny_model, inputs["reference"], global_hint=inputs["global_hint"],
                             local_hint=inputs["local_hint"], timesteps=timesteps)
    denoiser(timesteps[0], [BranchInput(inputs["x"], True, inputs["context"])])
    assert denoiser.carry() is None


def test_a_compiled_model_s_graphed_runs_carry_their_hint_features(tiny_model, inputs, counted, monkeypatch):
    """Load Model's compile with graphs (stood in: tests/graph_stand_ins.py; blocks compiled with Dynamo's eager
    backend): the banks come from the recorded reference net per timestep, not batched, and the next run takes the
    last run's hint features; eps as the uncompiled run's."""
    import torch._dynamo

    from graph_stand_ins import EagerGraphs
    from xportrait_core.fast import compilation, cuda_graphs
    from xportrait_core.fast.kept_graphs import KeptWindowGraphs
    from xportrait_core.sampling.batched_banks import BatchedReferenceBanks

    monkeypatch.setattr(cuda_graphs, "GuidanceGraphs", EagerGraphs)
    eager, _ = _run(tiny_model, inputs, seed=4)
    blocks = [m for name in compilation.NETWORKS for m in getattr(tiny_model, name).modules()
              if isinstance(m, compilation.ResBlock)]
    for block in blocks:
        block.compile(backend="eager", dynamic=False)
    compilation._compiled.add(tiny_model)
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            kept = KeptWindowGraphs()
            hints_before = counted["hints"]
            first, denoiser = _run(tiny_model, inputs, seed=4, cuda_graphs=True, kept_graphs=kept)
            assert not isinstance(denoiser._branches.banks, BatchedReferenceBanks)
            second, denoiser = _run(tiny_model, inputs, seed=4, cuda_graphs=True, kept_graphs=kept,
                                    carried=denoiser.carry())
            assert denoiser.took_carried and kept.recordings == 1
            assert counted["hints"] == hints_before + 1  # encoded by the first run only
        for a, b, c in zip(eager, first, second):
            assert (a - b).abs().max() < 1e-4 and (a - c).abs().max() < 1e-4
    finally:
        compilation._compiled.discard(tiny_model)
        for block in blocks:
            block._compiled_call_impl = None
        torch._dynamo.reset()
