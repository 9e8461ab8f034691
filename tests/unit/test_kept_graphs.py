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


def _run(model, job, kept=None, local_strength=0.5):
    """One two-step guided run (both branches) of `job`: its eps, the denoiser released at the end as ComfyUI's
    run does."""
    denoiser = VideoDenoiser(model, job["reference"], global_hint=job["global_hint"], local_hint=job["local_hint"],
                             global_strength=1.0, local_strength=local_strength, overlap=4, seed=5,
                             cuda_graphs=kept is not None, kept_graphs=kept)
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
