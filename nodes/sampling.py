"""X-Portrait Sampler: reference + motion -> animated frames (DDIM with guidance over overlapping windows)."""
from __future__ import annotations

import logging

from . import common
from .loader import check_model
from .motion import check_motion
from .reference import check_reference

INITIAL_LATENTS = {"noised reference": "reference", "noise": "noise", "noised init frames": "video"}
SAMPLERS = ("ddim", "lcm")
MAX_SEED = 0xFFFFFFFFFFFFFFFF
log = logging.getLogger("xportrait")


def _context(conditioning, name: str, width: int):
    """The (1, tokens, width) tensor of a CONDITIONING ([[tensor, {...}]]), refusing what X-Portrait cannot use."""
    node = "X-Portrait Sampler"
    if conditioning is None:
        return None
    if not isinstance(conditioning, (list, tuple)) or not conditioning or not isinstance(conditioning[0], (list, tuple)):
        raise ValueError(f"{node}: {name} is not a CONDITIONING (expected [[tensor, dict], ...])")
    if len(conditioning) > 1:
        raise ValueError(f"{node}: {name} holds {len(conditioning)} conditionings (Conditioning Combine?); X-Portrait "
                         "takes one: use Conditioning (Concat) or a single CLIP Text Encode")
    tensor = conditioning[0][0]
    if getattr(tensor, "ndim", 0) != 3 or tensor.shape[0] != 1:
        raise ValueError(f"{node}: {name} must be one (1, tokens, width) embedding, got "
                         f"{tuple(getattr(tensor, 'shape', ()))}")
    if tensor.shape[-1] != width:
        raise ValueError(f"{node}: {name} is {tensor.shape[-1]} wide but this X-Portrait model takes {width}: encode "
                         f"the prompt with an SD1.5 CLIP (ViT-L/14, 768 wide)")
    common.require_finite(tensor, f"{node}: {name}")
    return tensor


class Sampler:
    DESCRIPTION = ("Animates the reference with the motion: DDIM (official schedule) with classifier-free guidance "
                   "over 16-frame windows that overlap by 'window_overlap' frames. The conditional branch sees the "
                   "reference (attention bank) and both motion ControlNets; the unconditional branch neither. "
                   "Seed 999, 30 steps, guidance 5 and overlap 4 are the official demo's settings. With the "
                   "LCM-LoRA (X-Portrait Load LoRA), the 'lcm' sampler at 4-8 steps and guidance 1-2 is the "
                   "few-step path.")
    CATEGORY = common.CATEGORY
    SEARCH_ALIASES = common.SEARCH_ALIASES
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("frames", "latent")
    OUTPUT_TOOLTIPS = ("The animated frames at the reference's resolution, one per driving frame.",
                       "The same frames as SD1.5 latents, for decoding elsewhere (e.g. VAE Decode with an SD1.5 VAE).")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "xportrait_model": (common.MODEL_TYPE, {"tooltip": "From X-Portrait Load Model."}),
                "reference": (common.REFERENCE_TYPE, {"tooltip": "From X-Portrait Load Reference."}),
                "motion": (common.MOTION_TYPE, {"tooltip": "From X-Portrait Extract Motion or Hierarchical Motion "
                                                           "Attention."}),
                "seed": ("INT", {"default": 999, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Seeds every random draw (reference posterior, initial latents, window "
                                            "offsets): the same seed gives the same frames."}),
                "steps": ("INT", {"default": 30, "min": 1, "max": 1000,
                                  "tooltip": "Sampling steps: with ddim, on the official uniform schedule (30 runs 31 "
                                             "timesteps); with lcm, 4-8."}),
                "guidance": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                       "tooltip": "Classifier-free guidance scale (official: 5). 1 skips the "
                                                  "unconditional branch."}),
                "window_overlap": ("INT", {"default": 4, "min": 0, "max": 15,
                                           "tooltip": "Frames shared by neighbouring 16-frame windows; more overlap "
                                                      "is smoother and slower."}),
                "initial_latents": (list(INITIAL_LATENTS), {
                    "default": "noised reference",
                    "tooltip": "noised reference: start from the reference's latent noised to t=999 (official). "
                               "noise: start from pure noise. noised init frames: start from the init_frames "
                               "noised to t=999 (the official face-vid2vid option)."}),
            },
            "optional": {
                "positive": ("CONDITIONING", {
                    "tooltip": "Text conditioning of the conditional branch (CLIP Text Encode with an SD1.5 CLIP). "
                               "Default: the empty prompt through the checkpoint's own CLIP, as the official."}),
                "negative": ("CONDITIONING", {
                    "tooltip": "Text conditioning of the unconditional branch. Default: the empty prompt through the "
                               "checkpoint's CLIP, or 'positive' when the checkpoint has no CLIP."}),
                "init_frames": ("IMAGE", {
                    "tooltip": "With initial_latents 'noised init frames': a first animation to start from, one "
                               "frame per driving frame at the reference crop's framing (e.g. another animator's "
                               "output for the same crop, as the official face-vid2vid option); resized to the "
                               "reference's resolution."}),
                "sampler": (list(SAMPLERS), {
                    "default": "ddim",
                    "tooltip": "ddim: the official sampler. lcm: few-step LCM sampling, for a model with the SD1.5 "
                               "LCM-LoRA applied (X-Portrait Load LoRA); set steps to 4-8 and guidance to 1-2."}),
            },
        }

    def sample(self, xportrait_model, reference, motion, seed: int = 999, steps: int = 30, guidance: float = 5.0,
               window_overlap: int = 4, initial_latents: str = "noised reference", positive=None, negative=None,
               init_frames=None, sampler: str = "ddim"):
        node = "X-Portrait Sampler"
        handle = check_model(xportrait_model, node)
        reference = check_reference(reference, node)
        motion = check_motion(motion, node)
        # ComfyUI checked the ranges when the prompt was queued; NaN passes its checks, and widgets turned into
        # inputs are not checked there at all.
        checked = common.check_widgets(type(self), {"seed": seed, "steps": steps, "guidance": guidance,
                                                    "window_overlap": window_overlap,
                                                    "initial_latents": initial_latents, "sampler": sampler}, node)
        if checked is not True:
            raise ValueError(checked)
        if sampler == "lcm":
            from xportrait_core.sampling.lcm import ORIGINAL_INFERENCE_STEPS

            # LCM's schedule picks its timesteps from the ones it was distilled on.
            if int(steps) > ORIGINAL_INFERENCE_STEPS:
                raise ValueError(f"{node}: the lcm sampler takes at most {ORIGINAL_INFERENCE_STEPS} steps (it is "
                                 f"meant for 4-8); got {steps}: lower steps, or use ddim")
        if reference.resolution != motion.resolution:
            raise ValueError(f"{node}: the reference is {reference.resolution}px but the motion was extracted at "
                             f"{motion.resolution}px: connect the same reference to Extract Motion and the Sampler")
        init = INITIAL_LATENTS[initial_latents]
        if init == "video":
            if init_frames is None:
                raise ValueError(f"{node}: initial_latents 'noised init frames' needs init_frames connected")
            # The core checks there is one frame per driving frame.
            init_frames = common.image_batch(init_frames, f"{node}: init_frames")[..., :3]
        elif init_frames is not None:
            log.warning("%s: init_frames is connected but initial_latents is %r: the frames are not used", node,
                        initial_latents)
            init_frames = None
        width = handle.config.unet.context_dim
        context = _context(positive, "positive", width)
        uncond_context = _context(negative, "negative", width)
        if uncond_context is None and context is not None and handle.model.text_encoder is None:
            uncond_context = context  # no CLIP in the checkpoint to encode the empty prompt with

        from xportrait_core.fast.offload import sampling_working_memory
        from xportrait_core.sampling.pipeline import DECODE_CHUNK, DEFAULT_WINDOW, animate_latents, iter_frames, preview_strip

        # Room for the activations too, so ComfyUI unloads other models (upscalers, face restorers) if need be.
        model = handle.ready(memory_required=sampling_working_memory(
            reference.resolution, min(DEFAULT_WINDOW, motion.num_frames), handle.model.dtype, motion.num_frames,
            handle.config.unet.model_channels))
        progress = common.Progress(int(steps))
        decode_chunk = DECODE_CHUNK
        decode_calls = -(-motion.num_frames // decode_chunk)
        sampling_total = [0]

        def on_model_call(done: int, total: int) -> None:
            sampling_total[0] = total
            progress(done, total + decode_calls)

        previewer = common.latent_previewer()

        def on_step(_done: int, _steps: int, denoised) -> None:
            # What the frames look like so far: a few of them side by side, as ComfyUI's samplers preview theirs.
            progress.show(previewer(preview_strip(denoised)))

        def run(should_cancel):
            latents = animate_latents(
                model, reference.prepared, global_hint=motion.global_hint, local_hint=motion.local_hint,
                steps=int(steps), guidance_scale=float(guidance), overlap=int(window_overlap), seed=int(seed),
                init=init, init_frames=init_frames, context=context, uncond_context=uncond_context,
                global_strength=motion.global_strength, local_strength=motion.local_strength,
                callback=on_model_call, should_cancel=should_cancel, on_step=on_step if previewer else None,
                sampler=sampler, kept_graphs=handle.kept_graphs)
            frames = []
            for index, chunk in enumerate(iter_frames(model, latents, decode_chunk, should_cancel)):
                frames.append(chunk)
                progress(sampling_total[0] + index + 1, sampling_total[0] + decode_calls)
            return latents, frames

        latents, frames = common.run_cancellable(run)
        import numpy as np

        samples = common.to_comfy_latent(latents, model.config.vae.scale_factor)
        del latents
        common.soft_empty_cache()
        images = common.to_image(np.concatenate(frames))
        # Inputs were checked finite: NaN here comes from the computation (fp16 overflow, damaged weights).
        common.check_outputs(node, f"the computation overflowed in {str(model.dtype).replace('torch.', '')}: set "
                                   "X-Portrait Load Model's dtype to bf16 or fp32, or check the checkpoint file",
                             latent=samples, frames=images)
        return (images, {"samples": samples})


NODE_CLASS_MAPPINGS = {"XPortraitSampler": Sampler}
NODE_DISPLAY_NAME_MAPPINGS = {"XPortraitSampler": "X-Portrait Sampler"}
