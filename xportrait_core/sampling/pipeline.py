"""Reference portrait + motion hints -> animated frames: encode, start latents, sample, decode.

    reference image(s) --VAE--> reference latents -----------------------------+
    first reference --VAE, per-frame posterior sample, noised to t=999--> x_T   |   (or pure noise, or a video)
    motion hints (global, local) ------------------------------------------------+--> windowed DDIM with guidance
                                                                                          |
    frames (N, R, R, 3) float32 in [0, 1]  <--clamp--  VAE decode, `decode_chunk` frames at a time

Memory: the hints and the decoded frames stay on the CPU; the model sees one window of hints at a time, the VAE a
chunk of frames at a time, and the latents of the whole video (4 x R/8 x R/8 floats a frame) are all that lives on
the device across steps. `iter_frames` decodes chunk by chunk so a caller can write frames as they come.

Randomness: one CPU generator seeded with `seed`, drawn in this order: reference posterior samples, initial
latents, then per step the window offsets (and eta noise). The same seed gives the same frames.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..fast import cuda_graphs, offload
from ..fast.compilation import is_compiled
from .batched_banks import BatchedReferenceBanks
from .guidance import GuidedDenoiser
from ..media.image_formats import as_rgb_float, check_resolution, resize_image
from .initial_latents import (
    INITIAL_TIMESTEP,
    INITS,
    NOISE,
    REFERENCE,
    VIDEO,
    encode_reference,
    noise_initial_latents,
    reference_initial_latents,
    video_initial_latents,
)
from ..model.xportrait import XPortrait
from .lcm import lcm_timesteps, sample_lcm
from .pinned_hints import pinned_copy
from .sampler import UNIFORM, SamplingCancelled, ddim_timesteps, sample_ddim
from .windows import current_spread

# Defaults of the official demo script (core/test_xportrait.py).
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 5.0
DEFAULT_OVERLAP = 4
DEFAULT_SEED = 999
DEFAULT_WINDOW = 16
# The official decodes 16 latents at a time. Frames decode independently, so the chunk changes memory, not
# pixels: 4 frames a chunk peaked far lower than 16, at the same speed (benchmarks/NOTES.md).
DECODE_CHUNK = 4
# "ddim": the official sampler. "lcm": LCM multistep sampling, for a UNet with the LCM-LoRA merged (4-8 steps,
# guidance 1-2, as the X-Portrait authors suggest).
DDIM, LCM = "ddim", "lcm"
SAMPLERS = (DDIM, LCM)

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
ArrayLike = Union[np.ndarray, torch.Tensor]


def images_to_tensor(images, what: str) -> torch.Tensor:
    """Images -> float32 (N, 3, H, W) in [-1, 1] on the CPU.

    Accepts one image (H, W, 3), a batch (N, H, W, 3) or a list of images (numpy or torch, float in [0, 1] or
    uint8), and PreparedReference objects (their `.image`). All must have the same size.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, (list, tuple)):
        items = [getattr(im, "image", im) for im in images]
    elif hasattr(images, "image"):  # PreparedReference
        items = [images.image]
    else:
        array = np.asarray(images)
        items = list(array) if array.ndim == 4 else [array]
    if not items:
        raise ValueError(f"{what}: no images")
    items = [as_rgb_float(np.asarray(im.detach().cpu() if isinstance(im, torch.Tensor) else im), what)
             for im in items]
    sizes = {im.shape[:2] for im in items}
    if len(sizes) != 1:
        raise ValueError(f"{what}: images differ in size: {sorted(sizes)}")
    batch = np.stack(items).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(batch)) * 2.0 - 1.0


def hints_to_tensor(hint: ArrayLike, what: str) -> torch.Tensor:
    """A motion hint (N, 3, R, R) in [-1, 1] (numpy or torch) -> CPU tensor, without copying numpy (but for the
    page-locked copy kept on a CUDA machine).

    float16 / bfloat16 hints stay so (a long video's hints at half the memory: the model casts each window to its
    own dtype); other dtypes become float32."""
    tensor = torch.as_tensor(hint).detach()
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"{what} must be (frames, 3, R, R) in [-1, 1], got {tuple(tensor.shape)}")
    compact = tensor.dtype in (torch.float16, torch.bfloat16)
    # On a CUDA machine, in page-locked memory kept with `hint` for the runs that read it again (pinned_hints.py).
    return pinned_copy(hint, tensor.to("cpu", tensor.dtype if compact else torch.float32))


def _resolve_hints(motion, global_hint, local_hint):
    if motion is not None:
        if global_hint is not None or local_hint is not None:
            raise ValueError("pass either motion= or global_hint=/local_hint=, not both")
        global_hint, local_hint = motion.global_hint, motion.local_hint
    if global_hint is None and local_hint is None:
        raise ValueError("no motion: pass motion=MotionHints (face_alignment.extract_motion) or the hints")
    g = hints_to_tensor(global_hint, "global_hint") if global_hint is not None else None
    l = hints_to_tensor(local_hint, "local_hint") if local_hint is not None else None
    if g is not None and l is not None and g.shape != l.shape:
        raise ValueError(f"global_hint {tuple(g.shape)} and local_hint {tuple(l.shape)} differ in shape")
    return g, l


def _text_contexts(model: XPortrait, context, uncond_context, guidance_scale: float):
    """(cond context, uncond context or None) as (1, 77, C); the empty prompt where not given."""
    # Asked for before any heavy work, so a checkpoint without CLIP fails at once with the model's message.
    if context is None:
        context = model.empty_prompt_context()
    if guidance_scale != 1.0 and uncond_context is None:
        uncond_context = model.empty_prompt_context()
    for name, value in (("context", context), ("uncond_context", uncond_context)):
        if value is not None and (value.ndim != 3 or value.shape[0] != 1):
            raise ValueError(f"{name} must be (1, tokens, width), got {tuple(value.shape)}")
    return context, uncond_context


@torch.no_grad()
def sampler_graph_rules(steps: int) -> dict:
    """What the X-Portrait Sampler's run asks of `cuda_graphs.graphs_apply`: graphs for a run of `steps` steps under
    either allocator (its banks come batched into the graphs, as in the eager path)."""
    return dict(steps=steps)


def animate_latents(
    model: XPortrait,
    reference: Union[ArrayLike, Sequence[ArrayLike]],
    motion=None,
    *,
    global_hint: Optional[ArrayLike] = None,
    local_hint: Optional[ArrayLike] = None,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    eta: float = 0.0,
    window: int = DEFAULT_WINDOW,
    overlap: int = DEFAULT_OVERLAP,
    seed: Optional[int] = DEFAULT_SEED,
    generator: Optional[torch.Generator] = None,
    timestep_spacing: str = UNIFORM,
    init: str = REFERENCE,
    init_frames: Optional[Union[ArrayLike, Sequence[ArrayLike]]] = None,
    init_timestep: int = INITIAL_TIMESTEP,
    context: Optional[torch.Tensor] = None,
    uncond_context: Optional[torch.Tensor] = None,
    global_strength: float = 1.0,
    local_strength: float = 1.0,
    window_offsets: Optional[Sequence[int]] = None,
    callback: Optional[ProgressFn] = None,
    should_cancel: Optional[CancelFn] = None,
    encode_chunk: int = DECODE_CHUNK,
    on_step: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    sampler: str = DDIM,
    kept_graphs=None,
) -> torch.Tensor:
    """Sample the animation's latents: float32 (N, 4, R/8, R/8) on the model's device (scaled, VAE-ready).

    reference: the prepared reference (R, R, 3) float [0, 1] / uint8, a PreparedReference, or several of them
        ((B, R, R, 3) or a list): all go into the reference bank, in order; the first also seeds x_T.
    motion: face_alignment.MotionHints, or give global_hint/local_hint (N, 3, R, R) in [-1, 1] (None skips one).
    init: "reference" (official: reference latents noised to `init_timestep`), "noise", or "video" with
        `init_frames` (N images like the reference, e.g. a face-vid2vid result; resized to R if needed).
    seed / generator: a CPU generator seeded with `seed` unless one is given; seed None leaves it unseeded.
    context / uncond_context: (1, 77, C) text conditioning of the two branches; default the empty prompt, which
        needs a checkpoint with CLIP weights.
    callback(done, total): after every model window call. should_cancel(): checked between model calls; raises
        sampler.SamplingCancelled. on_step(steps_done, steps, denoised): after every step, with its x_0 latents
        (for previews: see `preview_strip`).
    sampler: "ddim" (official; `steps`, `eta` and `timestep_spacing` apply) or "lcm" (LCM multistep sampling on
        its own schedule of `steps` timesteps, for a UNet with the LCM-LoRA merged: see `sampling/lcm.py`).
    kept_graphs: a `fast.kept_graphs.KeptSamplerGraphs` owned by the caller (X-Portrait Load Model's handle), so
        that a later run of the same sizes and settings replays this run's CUDA graphs with no recording (not in
        low-VRAM mode).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == LCM and eta != 0:
        raise ValueError(f"eta={eta:g} is DDIM's; the LCM sampler always draws fresh noise between steps (use eta 0)")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    g_hint, l_hint = _resolve_hints(motion, global_hint, local_hint)
    hint = g_hint if g_hint is not None else l_hint
    num_frames, resolution = hint.shape[0], hint.shape[-1]
    if hint.shape[-2] != resolution:
        raise ValueError(f"motion hints must be square, got {tuple(hint.shape[-2:])}")
    check_resolution(resolution)
    references = images_to_tensor(reference, "reference")
    if tuple(references.shape[-2:]) != (resolution, resolution):
        raise ValueError(f"the reference is {tuple(references.shape[-2:])} but the motion hints are "
                         f"{resolution}x{resolution}: prepare both at the same resolution")
    max_window = model.config.motion.max_frames
    if min(window, num_frames) > max_window:
        raise ValueError(f"window {window} is longer than the motion modules' {max_window} frames; "
                         f"use at most {max_window} (the model was trained on {model.config.motion.window})")
    context, uncond_context = _text_contexts(model, context, uncond_context, guidance_scale)
    if sampler == LCM:
        timesteps = lcm_timesteps(steps, num_train_timesteps=model.config.schedule.num_timesteps)
    else:
        timesteps = ddim_timesteps(steps, timestep_spacing, model.config.schedule.num_timesteps)
    if generator is None:
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(int(seed))
        else:
            generator.seed()

    if init == VIDEO and init_frames is None:
        raise ValueError('init="video" needs init_frames')
    with offload.resident(model, "vae"):  # on the compute device already, unless the model runs low-VRAM
        reference_latents = encode_reference(model, references, generator)
        if init == REFERENCE:
            x_T = reference_initial_latents(model, references[:1], num_frames, generator, init_timestep)
        elif init == NOISE:
            x_T = noise_initial_latents(model, num_frames, resolution, resolution, generator)
        else:
            frames = _video_frames(init_frames, num_frames, resolution)
            x_T = video_initial_latents(model, frames, generator, init_timestep, encode_chunk)
    spread = current_spread()
    if spread is not None:
        # Several processes sample together (distributed.py): each drew the same numbers from the same seed, but
        # their VAEs need not round alike, and the sums they add up must be of one x.
        reference_latents, x_T = spread.same_everywhere(reference_latents), spread.same_everywhere(x_T)

    low_vram = offload.is_low_vram(model)
    denoiser = GuidedDenoiser.for_model(model, reference_latents, global_hint=g_hint, local_hint=l_hint,
                                        guidance_scale=guidance_scale, context=context,
                                        uncond_context=uncond_context, global_strength=global_strength,
                                        local_strength=local_strength,
                                        # Low-VRAM mode keeps the activations of one branch at a time.
                                        batch_branches=not low_vram)
    denoise = denoiser
    finished = False
    compiled = is_compiled(model)
    graph_rules = sampler_graph_rules(len(timesteps))
    graphs = cuda_graphs.graphs_apply(model.device, compiled, **graph_rules)
    try:
        if low_vram and denoiser.needs_cond:
            # Every timestep's bank now, while the reference net visits the GPU; then it goes back to the CPU.
            branches = denoiser.branches
            with offload.resident(model, "reference_net"):
                branches.banks = offload.precompute_reference_banks(
                    branches.banks, timesteps, cuda_graphs=graphs)
        elif denoiser.needs_cond and not (graphs and compiled):
            # The reference net of several timesteps in one call, not one call a step: without graphs that saves
            # launches, with them (uncompiled) the graphs copy each step's bank from these, computed outside the
            # recordings. Compiled blocks keep the recorded batch-1 pass (batched rows are another shape to compile).
            # The samplers walk the (increasing) timesteps from last to first.
            denoiser.branches.banks = BatchedReferenceBanks(denoiser.branches.banks, timesteps.flip(0))
        if kept_graphs is not None and not low_vram:
            denoise = kept_graphs.serve(denoiser, len(timesteps), graphs_apply=graphs)
        else:
            denoise = cuda_graphs.with_cuda_graphs(denoiser, **graph_rules)
        windows = dict(window=window, overlap=overlap, window_offsets=window_offsets, generator=generator,
                       callback=callback, should_cancel=should_cancel, on_step=on_step)
        if sampler == LCM:
            latents = sample_lcm(denoise, x_T, model.alphas_cumprod, timesteps, **windows)
        else:
            latents = sample_ddim(denoise, x_T, model.alphas_cumprod, timesteps, eta=eta, **windows)
        finished = True
        return latents
    except SamplingCancelled as error:
        message = str(error)
    finally:
        if kept_graphs is not None and not low_vram:
            kept_graphs.end_run(denoise, failed=not finished)
        else:
            denoise.release()
        del x_T
    # Raised afresh outside the handler: the sampler's exception (whose traceback holds its frames and their
    # arguments, x_T among them) is gone, so a host holding this one keeps no latents alive.
    raise SamplingCancelled(message)


def preview_strip(latents: torch.Tensor, max_frames: int = 4) -> torch.Tensor:
    """Up to `max_frames` frames of (N, 4, h, w) latents, evenly spaced from the first to the last, side by side
    as one (1, 4, h, k*w) latent: a preview that shows the motion, for any latent previewer."""
    count = min(max_frames, latents.shape[0])
    picks = torch.linspace(0, latents.shape[0] - 1, count).round().long().tolist()
    return torch.cat([latents[i] for i in picks], dim=-1)[None]


def _video_frames(init_frames, num_frames: int, resolution: int) -> torch.Tensor:
    if isinstance(init_frames, torch.Tensor) and init_frames.ndim == 4 and init_frames.shape[1] == 3:
        frames = init_frames.float().cpu()  # already (N, 3, H, W) in [-1, 1]
    else:
        batch = init_frames if isinstance(init_frames, (list, tuple)) else list(np.asarray(init_frames))
        batch = [resize_image(as_rgb_float(np.asarray(f), "init frame"), resolution, resolution) for f in batch]
        frames = images_to_tensor(batch, "init frames")
    if frames.shape[0] < num_frames:
        raise ValueError(f"init_frames has {frames.shape[0]} frames; the motion has {num_frames}")
    if tuple(frames.shape[-2:]) != (resolution, resolution):
        raise ValueError(f"init frames are {tuple(frames.shape[-2:])}, need {resolution}x{resolution}")
    return frames[:num_frames]


@torch.no_grad()
def iter_frames(model: XPortrait, latents: torch.Tensor, chunk: int = DECODE_CHUNK,
                should_cancel: Optional[CancelFn] = None) -> Iterator[np.ndarray]:
    """Decode `chunk` latents at a time; yields float32 (n, R, R, 3) numpy frames in [0, 1] (clamped as official)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    with offload.resident(model, "vae"):
        for start in range(0, latents.shape[0], chunk):
            if should_cancel is not None and should_cancel():
                raise SamplingCancelled(f"decoding cancelled after {start} of {latents.shape[0]} frames")
            images = model.decode_latents(latents[start:start + chunk], chunk=chunk)
            images = images.float().clamp(-1.0, 1.0).add(1.0).mul(0.5)
            yield images.permute(0, 2, 3, 1).cpu().numpy()
            del images


def decode_frames(model: XPortrait, latents: torch.Tensor, chunk: int = DECODE_CHUNK,
                  should_cancel: Optional[CancelFn] = None) -> np.ndarray:
    """All frames at once: float32 (N, R, R, 3) in [0, 1] on the CPU."""
    return np.concatenate(list(iter_frames(model, latents, chunk, should_cancel)))


def animate(model: XPortrait, reference, motion=None, *, decode_chunk: int = DECODE_CHUNK, **kwargs) -> np.ndarray:
    """The whole pipeline: frames float32 (N, R, R, 3) in [0, 1]. Arguments as `animate_latents`."""
    latents = animate_latents(model, reference, motion, **kwargs)
    return decode_frames(model, latents, decode_chunk, kwargs.get("should_cancel"))
