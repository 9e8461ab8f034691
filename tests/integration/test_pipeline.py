"""`animate` end to end with the real tiny model: shapes, seeds, initial latents, references, errors, cancellation."""
from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
import torch

from xportrait_core.sampling.initial_latents import (
    encode_reference,
    reference_initial_latents,
    video_initial_latents,
)
from xportrait_core.model.xportrait import MissingTextEncoderError
from xportrait_core.sampling.pipeline import (
    animate,
    animate_latents,
    decode_frames,
    images_to_tensor,
    iter_frames,
    preview_strip,
)
from xportrait_core.model.reference_bank import ReferenceBank
from xportrait_core.sampling.sampler import SamplingCancelled

FRAMES = 10


@pytest.fixture(scope="module")
def inputs(golden_cases):
    reference = ((golden_cases["vae_image"][0].permute(1, 2, 0).numpy() + 1) / 2).astype(np.float32)
    name = "sample20_overlap4"
    return dict(
        reference=reference,
        global_hint=golden_cases[f"{name}_global_hint"][:FRAMES].numpy(),
        local_hint=golden_cases[f"{name}_local_hint"][:FRAMES].numpy(),
        context=golden_cases[f"{name}_context"],
        uncond_context=golden_cases[f"{name}_uncond_context"],
    )


def _animate(model, inputs, **kwargs):
    args = dict(inputs)
    reference = args.pop("reference")
    kwargs = {"steps": 2, "window": 8, "overlap": 2, **kwargs}
    return animate(model, reference, **args, **kwargs)


def test_frames_shape_range_and_seed(tiny_model, inputs):
    a = _animate(tiny_model, inputs, seed=3)
    assert a.shape == (FRAMES, 64, 64, 3) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.array_equal(a, _animate(tiny_model, inputs, seed=3))
    assert np.abs(a - _animate(tiny_model, inputs, seed=4)).max() > 1e-3


def test_motion_hints_object_is_accepted(tiny_model, inputs):
    class Hints:  # the fields animate reads from face_alignment.MotionHints
        global_hint = inputs["global_hint"]
        local_hint = inputs["local_hint"]

    args = {k: v for k, v in inputs.items() if k not in ("global_hint", "local_hint", "reference")}
    via_object = animate_latents(tiny_model, inputs["reference"], Hints(), steps=2, seed=1, **args)
    via_arrays = animate_latents(tiny_model, inputs["reference"], steps=2, seed=1, **{**args,
                                 "global_hint": inputs["global_hint"], "local_hint": inputs["local_hint"]})
    assert torch.equal(via_object, via_arrays)


def test_initial_latent_choices(tiny_model, inputs):
    base = animate_latents(tiny_model, **inputs, steps=2, seed=0)
    noise = animate_latents(tiny_model, **inputs, steps=2, seed=0, init="noise")
    video = animate_latents(tiny_model, **inputs, steps=2, seed=0, init="video",
                            init_frames=np.repeat(inputs["reference"][None], FRAMES, axis=0)[..., ::-1])
    assert base.shape == noise.shape == video.shape == (FRAMES, 4, 8, 8)
    assert (base - noise).abs().max() > 1e-3 and (base - video).abs().max() > 1e-3
    with pytest.raises(ValueError, match="init_frames"):
        animate_latents(tiny_model, **inputs, steps=2, init="video")
    with pytest.raises(ValueError, match="init must be"):
        animate_latents(tiny_model, **inputs, steps=2, init="sketch")


def test_reference_initial_latents_are_noised_posterior_samples(tiny_model, inputs):
    reference = images_to_tensor(inputs["reference"], "reference")
    g = torch.Generator().manual_seed(0)
    x_T = reference_initial_latents(tiny_model, reference, 6, g)
    assert x_T.shape == (6, 4, 8, 8) and x_T.dtype == torch.float32
    # Fresh noise per frame, reproducible from the seed.
    assert (x_T[0] - x_T[1]).abs().max() > 0.1
    assert torch.equal(x_T, reference_initial_latents(tiny_model, reference, 6, torch.Generator().manual_seed(0)))
    # At t = 0 almost no noise is added: frames sit near the reference's posterior mean.
    near_clean = reference_initial_latents(tiny_model, reference, 64, torch.Generator().manual_seed(0), timestep=0)
    mean = encode_reference(tiny_model, reference, sample=False)[0]
    assert (near_clean.mean(0) - mean).abs().mean() < 0.25 * (near_clean - mean).abs().mean()
    # Video frames noised to 999 keep sqrt(alphas_cumprod[999]) of their content.
    assert tiny_model.alphas_cumprod[999] < 0.01
    v = video_initial_latents(tiny_model, reference.expand(3, -1, -1, -1), torch.Generator().manual_seed(1), chunk=2)
    assert v.shape == (3, 4, 8, 8)


def test_several_references_go_into_one_bank(tiny_model, inputs, monkeypatch):
    seen = []
    original = tiny_model.reference_bank
    monkeypatch.setattr(tiny_model, "reference_bank",
                        lambda lat, t, ctx: seen.append(lat.shape[0]) or original(lat, t, ctx))
    args = {k: v for k, v in inputs.items() if k != "reference"}
    two = [inputs["reference"], inputs["reference"][::-1].copy()]
    multi = animate_latents(tiny_model, two, steps=2, seed=0, **args)
    single = animate_latents(tiny_model, inputs["reference"], steps=2, seed=0, **args)
    assert seen == [2, 1]  # the banks of both steps from one call, on all references at once
    assert (multi - single).abs().max() > 1e-4


def test_input_errors(tiny_model, inputs):
    args = {k: v for k, v in inputs.items() if k not in ("context", "uncond_context")}
    with pytest.raises(MissingTextEncoderError, match="CLIP"):
        animate_latents(tiny_model, **args, steps=2)  # tiny weights have no CLIP and no context was given
    small = np.zeros((32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="same resolution"):
        animate_latents(tiny_model, small, **{k: v for k, v in inputs.items() if k != "reference"}, steps=2)
    with pytest.raises(ValueError, match="no motion"):
        animate_latents(tiny_model, inputs["reference"], steps=2)
    long_hint = np.repeat(inputs["global_hint"], 3, axis=0)
    with pytest.raises(ValueError, match="motion modules"):
        animate_latents(tiny_model, inputs["reference"], global_hint=long_hint, context=inputs["context"],
                        uncond_context=inputs["uncond_context"], window=30, steps=2)
    with pytest.raises(ValueError, match="differ in shape"):
        animate_latents(tiny_model, **{**inputs, "local_hint": inputs["local_hint"][:3]}, steps=2)


def test_decoding_in_chunks_matches_one_batch(tiny_model, inputs):
    latents = animate_latents(tiny_model, **inputs, steps=2, seed=0)
    chunks = list(iter_frames(tiny_model, latents, chunk=4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    whole = decode_frames(tiny_model, latents, chunk=FRAMES)
    np.testing.assert_allclose(np.concatenate(chunks), whole, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc.get_objects() touches deprecated torch aliases
def test_cancellation_releases_everything(tiny_model, inputs):
    calls = []
    shape = (FRAMES, 4, 8, 8)
    with pytest.raises(SamplingCancelled) as info:
        animate_latents(tiny_model, **inputs, steps=4, window=8, overlap=2, callback=lambda d, t: calls.append(d),
                        should_cancel=lambda: len(calls) >= 3)
    assert len(calls) == 3
    # While the host still holds the exception (and so every frame of its traceback), neither the reference bank
    # nor any latents of the video are kept alive.
    gc.collect()
    assert info.value is not None
    assert not [o for o in gc.get_objects() if isinstance(o, ReferenceBank)]
    assert not [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and tuple(o.shape) == shape]
    with pytest.raises(SamplingCancelled):
        list(iter_frames(tiny_model, torch.zeros(4, 4, 8, 8), chunk=2, should_cancel=lambda: True))


def test_low_vram_precomputes_every_bank_and_samples_the_same(tiny_model, inputs, monkeypatch):
    """In low-VRAM mode the reference net runs for every timestep before sampling (so it can leave the GPU);
    the banks are the same. It also runs the two guidance branches one after the other instead of as one batch,
    so the latents agree to float32 rounding. The device moves themselves are tested on a GPU (tests/test_cuda.py)."""
    from xportrait_core.fast import offload
    from xportrait_core.sampling.sampler import ddim_timesteps

    args = {k: v for k, v in inputs.items() if k != "reference"}
    normal = animate_latents(tiny_model, inputs["reference"], steps=3, seed=1, window=8, overlap=2, **args)
    calls = []
    original = tiny_model.reference_bank
    monkeypatch.setattr(tiny_model, "reference_bank", lambda lat, t, ctx: calls.append(t) or original(lat, t, ctx))
    monkeypatch.setattr(offload, "is_low_vram", lambda model: True)
    low = animate_latents(tiny_model, inputs["reference"], steps=3, seed=1, window=8, overlap=2, **args)
    assert calls == ddim_timesteps(3).tolist()  # all up front, once each, none during sampling (2 windows a step)
    torch.testing.assert_close(low, normal, atol=1e-4, rtol=1e-5)


def test_working_memory_estimate_scales_from_the_measured_case():
    import torch

    from xportrait_core.sampling.branches import RESIDENT_HINT_FEATURE_BYTES
    from xportrait_core.fast.offload import MEASURED_WORKING_BYTES, sampling_working_memory

    base = sampling_working_memory(512, 16, torch.bfloat16)
    assert base == MEASURED_WORKING_BYTES
    assert sampling_working_memory(1024, 16, torch.bfloat16) == 4 * base  # pixels
    assert sampling_working_memory(512, 8, torch.bfloat16) == base // 2  # window frames
    assert sampling_working_memory(512, 16, torch.float32) == 2 * base  # element size
    # The hints count while they stay on the GPU as both ControlNets' hint features (320 x 64 x 64 a frame at
    # 512), not once a long video's hints live in host memory.
    features64 = 2 * 64 * 320 * 64 * 64 * 2
    assert sampling_working_memory(512, 16, torch.bfloat16, num_frames=64) == base + features64
    assert 2 * 110 * 320 * 64 * 64 * 2 > RESIDENT_HINT_FEATURE_BYTES
    assert sampling_working_memory(512, 16, torch.bfloat16, num_frames=110) == base


def test_preview_strip_puts_evenly_spaced_frames_side_by_side():
    latents = torch.arange(10.0)[:, None, None, None].expand(10, 4, 3, 2)  # frame i is all i
    strip = preview_strip(latents)
    assert strip.shape == (1, 4, 3, 8)
    assert strip[0, 0, 0, ::2].tolist() == [0.0, 3.0, 6.0, 9.0]  # first, ..., last
    assert preview_strip(latents[:2]).shape == (1, 4, 3, 4)  # fewer frames than the strip holds
    assert torch.equal(preview_strip(latents[:1]), latents[:1])


def test_a_visiting_network_goes_home_without_its_weights_being_copied_back(tiny_model):
    """offload.resident: the reference net (or VAE) visits the compute device and comes back to the very tensors it
    left, so no weight crosses back from the GPU. The compute device is stood in for by 'meta' here."""
    from xportrait_core.fast import offload

    model = copy.deepcopy(tiny_model)
    vae = model.vae
    vae.register_buffer("marker", torch.arange(3.0))  # buffers come back too
    before = {k: (v.data_ptr(), v.clone()) for k, v in vae.state_dict().items()}
    model.unet.to("meta")  # the model's compute device is now "meta"
    with offload.resident(model, "vae") as visiting:
        assert all(p.device.type == "meta" for p in visiting.parameters())
        assert visiting.marker.device.type == "meta"
    after = vae.state_dict()
    for key, (pointer, value) in before.items():
        assert after[key].device.type == "cpu" and after[key].data_ptr() == pointer and torch.equal(after[key], value)


def test_without_cuda_graphs_the_banks_of_sixteen_timesteps_come_from_one_call(tiny_model, inputs, monkeypatch):
    """The default path without CUDA graphs (the CPU, ComfyUI's allocator) computes the reference banks of up to 16
    timesteps in one reference-net call, as the run reaches them: 31 timesteps take two calls (16 + 15), and the
    video is the one that per-timestep banks give."""
    from xportrait_core.sampling import pipeline

    calls = []
    original = tiny_model.reference_bank
    monkeypatch.setattr(tiny_model, "reference_bank", lambda lat, t, ctx: calls.append(ctx.shape[0]) or
                        original(lat, t, ctx))
    batched = _animate(tiny_model, inputs, seed=5, steps=30, window=FRAMES, overlap=0)
    assert calls == [16, 15]
    calls.clear()
    monkeypatch.setattr(pipeline, "BatchedReferenceBanks", lambda banks, timesteps: banks)
    per_step = _animate(tiny_model, inputs, seed=5, steps=30, window=FRAMES, overlap=0)
    assert calls == [1] * 31
    np.testing.assert_allclose(batched, per_step, atol=2e-5, rtol=0)


def test_the_pipeline_asks_for_graphs_for_its_run_length_under_either_allocator(tiny_model, inputs, monkeypatch):
    """Our Sampler and the CLI ask `cuda_graphs` once for the banks and once for the denoiser, with the run's
    length (the LCM path's few steps stay eager), under ComfyUI's allocator too: their batched banks go into the
    graphs as the banks they copy each step from."""
    from xportrait_core.fast import cuda_graphs

    asked = []
    monkeypatch.setattr(cuda_graphs, "graphs_apply", lambda device, compiled=False, **rules: asked.append(rules)
                        and False)
    _animate(tiny_model, inputs, seed=5, steps=6, window=FRAMES, overlap=0)
    # 6 steps: the official schedule's 7 timesteps; cuda_malloc_async at its default (True) or not given.
    with_default = [dict(dict(cuda_malloc_async=True), **rules) for rules in asked]
    assert with_default == [dict(steps=7, cuda_malloc_async=True)] * 2


def test_our_sampler_keeps_its_graphs_for_the_next_run_like_it_and_replays_them(tiny_model, inputs, monkeypatch):
    """animate_latents with a KeptSamplerGraphs (X-Portrait Load Model's handle owns one): a run that fits the kept
    graphs (another seed here) replays them with its own inputs and gives the eager result; another guidance
    scale records new graphs; a cancelled run leaves none. Graphs stood in (tests/graph_stand_ins.py)."""
    from graph_stand_ins import EagerGraphs

    from xportrait_core.fast import cuda_graphs
    from xportrait_core.fast.kept_graphs import KeptSamplerGraphs
    from xportrait_core.sampling.pipeline import animate_latents
    from xportrait_core.sampling.sampler import SamplingCancelled

    monkeypatch.setattr(EagerGraphs, "made", [])
    monkeypatch.setattr(cuda_graphs, "GuidanceGraphs", EagerGraphs)
    args = dict(inputs)
    reference = args.pop("reference")

    def run(kept, graphs, seed, guidance=5.0, **extra):
        monkeypatch.setattr(cuda_graphs, "graphs_apply", lambda device, compiled=False, **rules: graphs)
        return animate_latents(tiny_model, reference, **args, steps=20, window=8, overlap=2, seed=seed,
                               guidance_scale=guidance, kept_graphs=kept, **extra)

    kept = KeptSamplerGraphs()
    calls = []
    for seed in (3, 4):
        torch.testing.assert_close(run(kept, True, seed), run(None, False, seed), atol=1e-5, rtol=1e-5)
        calls.append(EagerGraphs.made[0].calls)
    assert 0 < calls[0] < calls[1]  # the second run's windows went through the kept graphs too
    assert kept.recordings == 1 and kept.served_again == 1 and len(EagerGraphs.made) == 1
    assert kept.graphed is not None and not EagerGraphs.made[0].released
    run(kept, True, 5, guidance=3.0)  # a constant of the recording: new graphs, the old ones released
    assert kept.recordings == 2 and EagerGraphs.made[0].released
    with pytest.raises(SamplingCancelled):
        run(kept, True, 5, guidance=3.0, should_cancel=lambda: True)
    assert kept.graphed is None and EagerGraphs.made[-1].released
