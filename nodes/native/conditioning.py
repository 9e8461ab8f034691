"""X-Portrait Conditioning: text conditioning + reference + motion -> conditioning and start latents for KSampler."""
from __future__ import annotations

from .. import common
from ..loader import check_model
from ..motion import check_motion
from ..reference import check_reference

NODE = "X-Portrait Conditioning"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def _with_branch(conditioning, name: str, branch):
    if not isinstance(conditioning, (list, tuple)) or not conditioning or not all(
            isinstance(c, (list, tuple)) and len(c) == 2 and isinstance(c[1], dict) for c in conditioning):
        raise ValueError(f"{NODE}: {name} is not a CONDITIONING (connect a CLIP Text Encode)")
    return [[c[0], {**c[1], "xportrait": branch}] for c in conditioning]


class XPortraitConditioning:
    DESCRIPTION = ("Makes X-Portrait samplable by KSampler, SamplerCustom and SamplerCustomAdvanced with the MODEL of "
                   "X-Portrait Load Model: the positive conditioning gets the reference (attention bank) and the "
                   "motion (both ControlNets), the negative gets neither, as the official code guides. The latent is "
                   "the reference's latent once per driving frame: sampled at denoise 1.0 it starts where the "
                   "official code starts (the reference noised to the last timestep). The latent batch is the frame "
                   "axis; 16-frame windows overlap by 'window_overlap' frames, their offsets seeded by the sampler's "
                   "seed, unless a context-window node cuts them.")
    CATEGORY = common.CATEGORY
    SEARCH_ALIASES = common.SEARCH_ALIASES
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("For the sampler's positive: the text, the reference and the motion.",
                       "For the sampler's negative: the text only (UNet and motion modules).",
                       "The start latents: the reference once per driving frame. Sample with denoise 1.0.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "xportrait_model": (common.MODEL_TYPE, {"tooltip": "From X-Portrait Load Model (its VAE encodes the "
                                                                   "reference)."}),
                "positive": ("CONDITIONING", {"tooltip": "Text of the conditional branch (CLIP Text Encode with the "
                                                         "loader's CLIP; the official prompt is empty)."}),
                "negative": ("CONDITIONING", {"tooltip": "Text of the unconditional branch (official: empty)."}),
                "reference": (common.REFERENCE_TYPE, {"tooltip": "From X-Portrait Load Reference."}),
                "motion": (common.MOTION_TYPE, {"tooltip": "From X-Portrait Extract Motion or Hierarchical Motion "
                                                           "Attention (its strengths apply)."}),
                "seed": ("INT", {"default": 999, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Seeds the reference's VAE posterior samples (as the official code draws "
                                            "them). The sampler's seed draws the noise and the window offsets."}),
                "window_overlap": ("INT", {"default": 4, "min": 0, "max": 15,
                                           "tooltip": "Frames shared by neighbouring 16-frame windows."}),
            },
        }

    def encode(self, xportrait_model, positive, negative, reference, motion, seed: int = 999,
               window_overlap: int = 4):
        handle = check_model(xportrait_model, NODE)
        reference = check_reference(reference, NODE)
        motion = check_motion(motion, NODE)
        if reference.resolution != motion.resolution:
            raise ValueError(f"{NODE}: the reference is {reference.resolution}px but the motion was extracted at "
                             f"{motion.resolution}px: connect the same reference to Extract Motion and here")
        if not 0 <= int(window_overlap) < 16:
            raise ValueError(f"{NODE}: window_overlap must be in [0, 15], got {window_overlap}")
        import torch

        from xportrait_core.fast import offload
        from xportrait_core.sampling.initial_latents import encode_reference, reference_frame_latents
        from xportrait_core.sampling.pipeline import hints_to_tensor, images_to_tensor

        from .adapter import XPortraitBranch, XPortraitJob

        model = handle.ready()
        references = images_to_tensor(reference.prepared, f"{NODE}: reference")
        generator = torch.Generator().manual_seed(int(seed))
        # The same draws, in the same order, as the Sampler's: the bank's posterior samples, then one per frame.
        with offload.resident(model, "vae"):
            reference_latents = encode_reference(model, references, generator)
            start = reference_frame_latents(model, references[:1], motion.num_frames, generator)
        job = XPortraitJob(
            reference_latents=reference_latents.cpu(),
            global_hint=hints_to_tensor(motion.global_hint, "global_hint") if motion.global_hint is not None else None,
            local_hint=hints_to_tensor(motion.local_hint, "local_hint") if motion.local_hint is not None else None,
            global_strength=float(motion.global_strength), local_strength=float(motion.local_strength),
            window=model.config.motion.window, overlap=int(window_overlap), seed=int(seed))
        samples = common.to_comfy_latent(start, model.config.vae.scale_factor)
        return (_with_branch(positive, "positive", XPortraitBranch(job, conditional=True)),
                _with_branch(negative, "negative", XPortraitBranch(job, conditional=False)),
                {"samples": samples})


NODE_CLASS_MAPPINGS = {"XPortraitConditioning": XPortraitConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"XPortraitConditioning": "X-Portrait Conditioning"}
