"""KSampler's window graphs kept from run to run (fast/kept_graphs.py), graphs stood in on the CPU: a run that fits
the kept graphs replays them with its own reference, texts and hints; any other run gets new ones."""
from __future__ import annotations

import pytest
import torch

from xportrait_core.fast import cuda_graphs
from xportrait_core.fast.kept_graphs import KeptWindowGraphs
from xportrait_core.sampling.video_denoiser import BranchInput, VideoDenoiser
from graph_stand_ins import EagerGraphs

FRAMES = 6


@pytest.fixture
def stand_in_graphs(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "GuidanceGraphs", EagerGraphs)
    EagerGraphs.made.clear()
    return EagerGraphs.made


def _job(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = model.config.image_size // 8
    width = model.config.unet.context_dim
    return dict(x=torch.randn(FRAMES, 4, h, h, generator=g), reference=torch.randn(1, 4, h, h, generator=g),
                global_hint=torch.rand(FRAMES, 3, h * 8, h * 8, generator=g) * 2 - 1,
                local_hint=torch.rand(FRAMES, 3, h * 8, h * 8, generator=g) * 2 - 1,
                context=torch.randn(1, 77, width, generator=g), uncond_context=torch.randn(1, 77, width, generator=g))


def _run(model, job, kept=None, local_strength=0.5, steps=None, graphs=None):
    """Two guided steps (both branches) of `job`, of a run of `steps` steps (None: the length is not known): their
    eps, the denoiser released at the end as ComfyUI's run does. graphs: whether graphs apply (default: with
    `kept`)."""
    timesteps = None if steps is None else [500, 400] + [300 - 10 * i for i in range(steps - 2)]
    denoiser = VideoDenoiser(model, job["reference"], global_hint=job["global_hint"], local_hint=job["local_hint"],
                             global_strength=1.0, local_strength=local_strength, overlap=4, seed=5,
                             timesteps=timesteps, cuda_graphs=kept is not None if graphs is None else graphs,
                             kept_graphs=kept)
    branches = [BranchInput(job["x"], True, job["context"]), BranchInput(job["x"].clone(), False,
                                                                           job["uncond_context"])]
    out = [torch.cat(denoiser(t, branches, same_latents=True)) for t in (500, 400)]
    denoiser.release()
    return out


def test_a_run_that_fits_replays_the_kept_graphs_with_its_own_reference_texts_and_hints(tiny_model, stand_in_graphs):
    kept = KeptWindowGraphs()
    first, second = _job(tiny_model, 1), _job(tiny_model, 2)
    context_of_first = first["context"].clone()
    for job in (first, second):
        for graphed, eager in zip(_run(tiny_model, job, kept), _run(tiny_model, job)):
            assert (graphed - eager).abs().max() < 1e-5
    assert kept.served_again == 1 and len(stand_in_graphs) == 1 and not stand_in_graphs[0].released
    assert stand_in_graphs[0].forgotten == 1  # no bank of the first run is reused
    # The graphs read private copies: the second run's values never went into the first run's tensors.
    assert torch.equal(first["context"], context_of_first)
    kept.release()
    assert stand_in_graphs[0].released and kept.graphs is None


def test_other_settings_or_moved_weights_get_new_graphs_and_the_old_ones_go(tiny_model, stand_in_graphs):
    kept = KeptWindowGraphs()
    job = _job(tiny_model, 3)
    _run(tiny_model, job, kept)
    first = kept.graphs
    _run(tiny_model, job, kept, local_strength=0.75)  # a strength is recorded as a constant
    assert kept.graphs is not first and kept.served_again == 0 and stand_in_graphs[0].released
    second = kept.graphs
    conv = tiny_model.unet.input_blocks[0][0]
    saved = conv.weight
    try:
        # ComfyUI patching a LoRA in (or moving the model) replaces a weight's tensor: the graphs' address is stale.
        conv.weight = torch.nn.Parameter(saved.detach().clone())
        _run(tiny_model, job, kept, local_strength=0.75)
        assert kept.graphs is not second and kept.served_again == 0
    finally:
        conv.weight = saved


SHORT, LONG = cuda_graphs.MIN_GRAPHED_STEPS - 1, 30


def _calls(stand_in_graphs) -> int:
    """Window calls served through the (stood-in) graphs: a recording's first call and the replays."""
    return sum(graphs.calls for graphs in stand_in_graphs)


def test_a_short_run_records_only_when_it_repeats_the_last_run_and_later_runs_replay(tiny_model, stand_in_graphs):
    """A run too short to repay a recording stays eager; the same run again (another seed, reference or hints of
    the same shapes: a re-queued workflow) records and keeps the graphs; the next replays them."""
    kept = KeptWindowGraphs()
    jobs = [_job(tiny_model, seed) for seed in (11, 12, 13)]
    eager_runs = _run(tiny_model, jobs[0], steps=SHORT)  # eager, with the same batched banks
    for graphed, eager in zip(_run(tiny_model, jobs[0], kept, steps=SHORT), eager_runs):
        assert (graphed - eager).abs().max() < 1e-5
    assert kept.graphs is None and not stand_in_graphs and kept.recordings == 0
    eager_runs = _run(tiny_model, jobs[1], steps=SHORT)  # eager, with the same batched banks
    for graphed, eager in zip(_run(tiny_model, jobs[1], kept, steps=SHORT), eager_runs):
        assert (graphed - eager).abs().max() < 1e-5
    assert kept.recordings == 1 and kept.served_again == 0 and len(stand_in_graphs) == 1
    calls = _calls(stand_in_graphs)
    assert calls > 0
    eager_runs = _run(tiny_model, jobs[2], steps=SHORT)  # eager, with the same batched banks
    for graphed, eager in zip(_run(tiny_model, jobs[2], kept, steps=SHORT), eager_runs):
        assert (graphed - eager).abs().max() < 1e-5
    assert kept.recordings == 1 and kept.served_again == 1 and len(stand_in_graphs) == 1
    assert _calls(stand_in_graphs) == 2 * calls  # every window of the third run through the kept graphs
    # Kept graphs serve a fitting run whatever its length.
    _run(tiny_model, jobs[0], kept, steps=2)
    assert kept.recordings == 1 and kept.served_again == 2


def test_a_short_run_unlike_the_last_one_stays_eager(tiny_model, stand_in_graphs):
    kept = KeptWindowGraphs()
    job = _job(tiny_model, 14)
    _run(tiny_model, job, kept, steps=SHORT)
    _run(tiny_model, job, kept, steps=SHORT, local_strength=0.75)  # a strength is recorded as a constant
    two_references = {**job, "reference": torch.cat([job["reference"]] * 2)}
    _run(tiny_model, two_references, kept, steps=SHORT, local_strength=0.75)
    assert kept.graphs is None and not stand_in_graphs and kept.recordings == 0
    # Each of them was remembered in turn: the last one, repeated, records.
    _run(tiny_model, two_references, kept, steps=SHORT, local_strength=0.75)
    assert kept.recordings == 1 and kept.graphs is not None


def test_a_short_run_after_kept_graphs_of_another_run_releases_them_and_stays_eager(tiny_model, stand_in_graphs):
    kept = KeptWindowGraphs()
    job = _job(tiny_model, 15)
    _run(tiny_model, job, kept, steps=LONG)
    _run(tiny_model, job, kept, steps=SHORT, local_strength=0.75)
    assert stand_in_graphs[0].released and kept.graphs is None and kept.recordings == 1
    assert kept.served_again == 0


def test_a_run_without_graphs_or_a_release_in_between_is_no_repeat(tiny_model, stand_in_graphs):
    """The remembered run goes with the kept graphs: a run where graphs do not apply, or a release (ComfyUI
    unloading the model, a failed run), leaves the next short run with nothing to repeat."""
    kept = KeptWindowGraphs()
    job = _job(tiny_model, 16)
    _run(tiny_model, job, kept, steps=SHORT)
    _run(tiny_model, job, kept, steps=SHORT, graphs=False)
    _run(tiny_model, job, kept, steps=SHORT)
    kept.release()
    _run(tiny_model, job, kept, steps=SHORT)
    assert kept.recordings == 0 and not stand_in_graphs
    # With graphs kept, a run where they do not apply releases them.
    _run(tiny_model, job, kept, steps=SHORT)
    assert kept.recordings == 1
    _run(tiny_model, job, kept, steps=SHORT, graphs=False)
    assert stand_in_graphs[0].released and kept.graphs is None


def test_a_run_long_enough_records_at_once_and_the_next_replays_as_before(tiny_model, stand_in_graphs):
    kept = KeptWindowGraphs()
    first, second = _job(tiny_model, 17), _job(tiny_model, 18)
    _run(tiny_model, first, kept, steps=LONG)
    assert kept.recordings == 1 and kept.served_again == 0
    calls = _calls(stand_in_graphs)
    _run(tiny_model, second, kept, steps=LONG)
    assert kept.recordings == 1 and kept.served_again == 1 and _calls(stand_in_graphs) == 2 * calls


def test_without_a_keeper_only_a_run_long_enough_records(tiny_model, stand_in_graphs):
    """A denoiser given no kept graphs (each run its own) records only for a run that repays it alone."""
    job = _job(tiny_model, 19)
    _run(tiny_model, job, steps=SHORT, graphs=True)
    assert not stand_in_graphs
    _run(tiny_model, job, steps=LONG, graphs=True)
    assert len(stand_in_graphs) == 1 and stand_in_graphs[0].released
