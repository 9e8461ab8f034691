"""X-Portrait Load Reference: one portrait or a batch of them -> square model inputs and the way back to the photo."""
from __future__ import annotations

from dataclasses import dataclass

from . import common

CROP_MODES = ("crop", "resize")


@dataclass(eq=False)  # holds numpy arrays: compare by identity
class XPortraitReference:
    """What travels on an XPORTRAIT_REFERENCE socket.

    prepared: one `xportrait_core.faces.reference_crop.PreparedReference` per input image (crop, crop box, source photo);
        the first is the portrait that is animated (and pasted back into), the others add appearance detail.
    The reference latents are not stored: the VAE lives in the model, which this node does not take, and the
    official latents are posterior samples drawn from the Sampler's seed, so the Sampler encodes them.
    """

    prepared: list

    @property
    def resolution(self) -> int:
        return int(self.prepared[0].resolution)

    @property
    def primary(self):
        return self.prepared[0]

    def __len__(self) -> int:
        return len(self.prepared)


class LoadReference:
    DESCRIPTION = ("Prepares the portrait(s) to animate: finds the face, takes a square around it (or stretches the "
                   "whole image, as the official demo does) and resizes it to the model's resolution. A batch of "
                   "images gives several references: the first is animated, the others add appearance detail "
                   "(e.g. the other side of the face, teeth, hair).")
    CATEGORY = common.CATEGORY
    RETURN_TYPES = (common.REFERENCE_TYPE, "IMAGE")
    RETURN_NAMES = ("reference", "crops")
    OUTPUT_TOOLTIPS = ("The prepared reference(s), for Extract Motion, the Sampler, Identity Check and Paste Back.",
                       "The square model inputs, one per reference, for checking the framing.")
    FUNCTION = "prepare"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The portrait to animate, or a batch of portraits of the same person "
                                               "(the first is animated)."}),
                "crop_margin": ("FLOAT", {
                    "default": 0.5, "min": 0.0, "max": 3.0, "step": 0.05,
                    "tooltip": "crop mode: space added around the face on each side, as a fraction of the face size "
                               "(0.5: the square is twice the face)."}),
                "resolution": ("INT", {
                    "default": 512, "min": 64, "max": 2048, "step": 64,
                    "tooltip": "Side of the square the model animates. The model was trained at 512."}),
                "mode": (list(CROP_MODES), {
                    "default": "crop",
                    "tooltip": "crop: a square around the face (works on any photo, paste back returns full "
                               "frames). resize: stretch the whole image to a square, as the official demo does "
                               "(for tight, square portraits)."}),
            }
        }

    def prepare(self, image, crop_margin: float = 0.5, resolution: int = 512, mode: str = "crop"):
        if mode not in CROP_MODES:
            raise ValueError(f"mode must be one of {', '.join(CROP_MODES)}, got {mode!r}")
        batch = common.image_batch(image, "X-Portrait Load Reference: image")

        from xportrait_core.faces.reference_crop import prepare_references, stack_references

        prepared = prepare_references(batch, resolution=int(resolution), mode=mode, margin=float(crop_margin))
        return (XPortraitReference(prepared), common.to_image(stack_references(prepared)))


def check_reference(reference, node: str) -> XPortraitReference:
    if not isinstance(reference, XPortraitReference) or len(reference) == 0:
        raise ValueError(f"{node}: 'reference' must come from X-Portrait Load Reference, got {type(reference).__name__}")
    return reference


NODE_CLASS_MAPPINGS = {"XPortraitLoadReference": LoadReference}
NODE_DISPLAY_NAME_MAPPINGS = {"XPortraitLoadReference": "X-Portrait Load Reference"}
