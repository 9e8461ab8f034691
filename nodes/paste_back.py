"""X-Portrait Paste Back: the animated square crops back into the full-resolution reference photo."""
from __future__ import annotations

from . import common
from .reference import check_reference

AUTO_FEATHER = -1


class PasteBack:
    DESCRIPTION = ("Puts each animated frame back into the reference photo where its crop came from, with a feathered "
                   "edge, giving frames at the photo's full resolution. Frames of any size are accepted (e.g. after "
                   "an upscaler or face restorer); outside the crop the photo is unchanged.")
    CATEGORY = common.CATEGORY
    SEARCH_ALIASES = common.SEARCH_ALIASES
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("frames", "mask")
    OUTPUT_TOOLTIPS = ("The full-resolution frames.",
                       "Where the animated crop was blended in (1 inside, feathered to 0 at the crop's edge).")
    FUNCTION = "paste"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "Animated frames (square crops of any size)."}),
                "reference": (common.REFERENCE_TYPE, {"tooltip": "From X-Portrait Load Reference: the first "
                                                                 "reference's photo and crop box are used."}),
                "feather": ("INT", {"default": AUTO_FEATHER, "min": AUTO_FEATHER, "max": 4096,
                                    "tooltip": "Width in photo pixels of the blend at the crop's edge. -1: a tenth "
                                               "of the crop's side. 0: hard edge."}),
            }
        }

    def paste(self, frames, reference, feather: int = AUTO_FEATHER):
        node = "X-Portrait Paste Back"
        checked = common.check_widgets(type(self), {"feather": feather}, node)
        if checked is not True:
            raise ValueError(checked)
        reference = check_reference(reference, node)
        batch = common.image_batch(frames, f"{node}: frames")
        feather = int(feather)

        import numpy as np

        from xportrait_core.faces.paste_back import paste_frame, paste_mask

        photo = reference.primary
        mask = paste_mask(photo, None if feather == AUTO_FEATHER else feather)
        height, width = photo.source_size
        out = np.empty((len(batch), height, width, 3), np.float32)
        progress = common.Progress(len(batch))
        for index, frame in enumerate(batch):
            common.throw_if_interrupted()
            paste_frame(frame, photo, mask, out=out[index])
            progress(index + 1, len(batch))
        return (common.to_image(out), common.to_mask(mask))


NODE_CLASS_MAPPINGS = {"XPortraitPasteBack": PasteBack}
NODE_DISPLAY_NAME_MAPPINGS = {"XPortraitPasteBack": "X-Portrait Paste Back"}
