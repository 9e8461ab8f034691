"""X-Portrait Load Reference: one portrait or a batch of them -> square model inputs and the way back to the photo."""
from __future__ import annotations

from dataclasses import dataclass

from . import common

CROP_MODES = ("crop", "resize")
FACE_ORDERS = ("largest first", "left to right")  # xportrait_core.faces.landmarks.FACE_ORDERS
NODE = "X-Portrait Load Reference"


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
                   "(e.g. the other side of the face, teeth, hair). In a photo of several people, face_index picks "
                   "the person; the 'faces' output numbers the faces found.")
    CATEGORY = common.CATEGORY
    SEARCH_ALIASES = common.SEARCH_ALIASES
    RETURN_TYPES = (common.REFERENCE_TYPE, "IMAGE", "IMAGE")
    RETURN_NAMES = ("reference", "crops", "faces")
    OUTPUT_TOOLTIPS = ("The prepared reference(s), for Extract Motion, the Sampler, Identity Check and Paste Back.",
                       "The square model inputs, one per reference, for checking the framing.",
                       "The first image with every face found boxed and numbered as face_index counts them (the "
                       "chosen one in green).")
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
                               "(for tight, square portraits; needs no face)."}),
            },
            "optional": {
                "face_index": ("INT", {
                    "default": 0, "min": 0, "max": 63,
                    "tooltip": "Which face to animate when the photo shows several people: 0 is the first in "
                               "face_order (default: the largest). The 'faces' output shows the numbers."}),
                "face_order": (list(FACE_ORDERS), {
                    "default": FACE_ORDERS[0],
                    "tooltip": "How faces are numbered for face_index: largest first, or left to right."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, resolution=None):
        # ComfyUI checks the widget's range; a multiple of 64 needs this (and ComfyUI then leaves the range to it).
        checked = common.check_widgets(cls, {"resolution": resolution}, NODE)
        if checked is True and resolution is not None and int(resolution) % 64:
            return (f"{NODE}: resolution is {resolution}; it must be a multiple of 64 (the model's VAE and UNet "
                    f"halve it six times): try {max(64, round(int(resolution) / 64) * 64)}")
        return checked

    def prepare(self, image, crop_margin: float = 0.5, resolution: int = 512, mode: str = "crop",
                face_index: int = 0, face_order: str = FACE_ORDERS[0], unique_id=None):
        checked = self.VALIDATE_INPUTS(resolution=resolution)
        if checked is True:  # NaN passes ComfyUI's range checks; widgets turned into inputs skip them
            checked = common.check_widgets(type(self), {"crop_margin": crop_margin, "mode": mode,
                                                        "face_index": face_index, "face_order": face_order}, NODE)
        if checked is not True:
            raise ValueError(checked)
        batch = common.image_batch(image, f"{NODE}: image")

        from xportrait_core.faces.landmarks import FaceIndexError, NoFaceFoundError
        from xportrait_core.faces.reference_crop import draw_numbered_faces, prepare_references, stack_references

        try:
            prepared = prepare_references(batch, resolution=int(resolution), mode=mode, margin=float(crop_margin),
                                          face_index=int(face_index), face_order=face_order)
        except (NoFaceFoundError, FaceIndexError) as exc:
            raise ValueError(f"{NODE}: {exc}") from None
        primary = prepared[0]
        faces = draw_numbered_faces(primary.source_image, primary.faces, primary.face)
        lines = []
        if len(primary.faces) > 1:
            lines.append(f"{len(primary.faces)} faces found; animating face {int(face_index)} ({face_order}): see "
                         "the 'faces' output")
        if primary.face is None:
            lines.append("Warning: no face found in the reference (mode resize): Extract Motion will not align the "
                         "driving face onto it")
        return common.with_report((XPortraitReference(prepared), common.to_image(stack_references(prepared)),
                                   common.to_image(faces)), lines, unique_id)


def check_reference(reference, node: str) -> XPortraitReference:
    if not isinstance(reference, XPortraitReference) or len(reference) == 0:
        raise ValueError(f"{node}: 'reference' must come from X-Portrait Load Reference, got {type(reference).__name__}")
    return reference


NODE_CLASS_MAPPINGS = {"XPortraitLoadReference": LoadReference}
NODE_DISPLAY_NAME_MAPPINGS = {"XPortraitLoadReference": NODE}
