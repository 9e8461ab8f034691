"""X-Portrait Identity Check: does every frame still show the reference's person (and not the driving actor)?"""
from __future__ import annotations

from . import common
from .reference import check_reference


class IdentityCheck:
    DESCRIPTION = ("Measures identity preservation frame by frame with dlib's face descriptors: the distance of each "
                   "frame's face to the reference's (dlib's usual 'same person' cut is 0.6) and, with the driving "
                   "frames, to the driving actor's (appearance leakage). Works on any frames: straight from the "
                   "Sampler, after a face restorer or upscaler, or after Paste Back.")
    CATEGORY = common.CATEGORY
    SEARCH_ALIASES = common.SEARCH_ALIASES
    RETURN_TYPES = ("FLOAT", "STRING", "IMAGE", "FLOAT")
    RETURN_NAMES = ("mean_similarity", "report", "plot", "mean_distance")
    OUTPUT_TOOLTIPS = (
        ("Mean cosine similarity of the frames' face descriptors to the reference's over the frames with a face "
         "(1 = identical; 0 when no frame has a face)."),
        "A short text report: mean and worst distance, frames over the threshold, frames without a face, leakage.",
        "A chart of the per-frame distances (reference, driving, threshold).",
        ("Mean descriptor distance to the reference over the frames with a face (lower is closer; under 0.6 is "
         "usually the same person; -1 when no frame has a face)."),
    )
    FUNCTION = "check"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "reference": (common.REFERENCE_TYPE, {"tooltip": "From X-Portrait Load Reference (the first "
                                                                 "reference is the identity compared with)."}),
                "frames": ("IMAGE", {"tooltip": "The frames to check, any size."}),
                "threshold": ("FLOAT", {"default": 0.6, "min": 0.05, "max": 2.0, "step": 0.01,
                                        "tooltip": "Distance above which a frame is reported as drifting away from "
                                                   "the reference's identity."}),
            },
            "optional": {
                "driving_frames": ("IMAGE", {"tooltip": "The driving frames (one per frame): also reports frames that "
                                                        "look more like the driving actor than like the reference."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def check(self, reference, frames, threshold: float = 0.6, driving_frames=None, unique_id=None):
        node = "X-Portrait Identity Check"
        checked = common.check_widgets(type(self), {"threshold": threshold}, node)
        if checked is not True:
            raise ValueError(checked)
        reference = check_reference(reference, node)
        frames = common.image_batch(frames, f"{node}: frames")
        driving = None
        if driving_frames is not None:
            driving = common.image_batch(driving_frames, f"{node}: driving_frames")
            if len(driving) != len(frames):
                raise ValueError(f"{node}: got {len(frames)} frames but {len(driving)} driving frames: connect the "
                                 "driving frames the animation was made from (one per frame)")
        common.throw_if_interrupted()

        import math

        from xportrait_core.faces.identity import measure_identity, plot_identity
        from xportrait_core.faces.landmarks import NoFaceFoundError
        from xportrait_core.media.image_formats import as_rgb_float

        # Face descriptors take a while per frame: stop between frames.
        progress = common.interruptible_progress(len(frames) * (2 if driving is not None else 1))
        try:
            report = measure_identity(reference.primary.image, frames, driving, threshold=float(threshold),
                                      progress=progress)
        except NoFaceFoundError as exc:
            raise ValueError(f"{node}: {exc} The identity is measured against the reference's face.") from None
        summary = report.summary()
        plot = as_rgb_float(plot_identity(report), "identity plot")
        text = report.summary_text()
        # No face in any frame: the means are undefined; say so in the report, never hand NaN to the next node.
        similarity = summary["mean_cosine"] if math.isfinite(summary["mean_cosine"]) else 0.0
        distance = summary["mean_distance"] if math.isfinite(summary["mean_distance"]) else -1.0
        return common.with_report((float(similarity), text, common.to_image(plot), float(distance)),
                                  text.splitlines(), unique_id)


NODE_CLASS_MAPPINGS = {"XPortraitIdentityCheck": IdentityCheck}
NODE_DISPLAY_NAME_MAPPINGS = {"XPortraitIdentityCheck": "X-Portrait Identity Check"}
