"""X-Portrait Extract Motion and Hierarchical Motion Attention: driving frames -> the two ControlNets' hints."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from . import common
from .reference import FACE_ORDERS, check_reference

BEST_FRAME_AUTO = -1
NO_ALIGNMENT = -2


@dataclass(frozen=True, eq=False)  # holds numpy arrays: compare by identity
class XPortraitMotion:
    """What travels on an XPORTRAIT_MOTION socket.

    hints: `xportrait_core.faces.motion_hints.MotionHints` (global and local hints, boxes, best frame, warnings).
    local_hint: the local hint the Sampler uses: `hints.local_hint`, or a copy restricted to some regions.
    global_strength / local_strength: scales of the two ControlNets' residuals (0 skips that ControlNet exactly).
    """

    hints: Any
    local_hint: Any
    global_strength: float = 1.0
    local_strength: float = 1.0
    regions: str = "eyes and mouth"

    @property
    def num_frames(self) -> int:
        return int(self.hints.num_frames)

    @property
    def resolution(self) -> int:
        return int(self.hints.resolution)

    @property
    def global_hint(self):
        return self.hints.global_hint


def check_motion(motion, node: str) -> XPortraitMotion:
    if not isinstance(motion, XPortraitMotion):
        raise ValueError(f"{node}: 'motion' must come from X-Portrait Extract Motion, got {type(motion).__name__}")
    return motion


class ExtractMotion:
    DESCRIPTION = ("Turns the driving video's frames into motion hints, as the official preprocessing does: every "
                   "frame is warped so the driving face sits where the reference's face is (aligned on the best "
                   "matching frame), giving the global hint (whole aligned frame) and the local hint (eye and "
                   "mouth patches only). With several people in the video, face_index picks the driving face, "
                   "which is then followed from frame to frame. Frames without a face are reported on the node.")
    CATEGORY = common.CATEGORY
    SEARCH_ALIASES = common.SEARCH_ALIASES
    RETURN_TYPES = (common.MOTION_TYPE, "IMAGE", "IMAGE", "INT", "STRING", "IMAGE")
    RETURN_NAMES = ("motion", "global_hints", "local_hints", "best_frame", "report", "faces")
    OUTPUT_TOOLTIPS = (
        "The motion hints, for Hierarchical Motion Attention or the Sampler.",
        "The aligned driving frames (global ControlNet input).",
        "The eye and mouth patches (local ControlNet input).",
        "The driving frame aligned onto the reference, or -2 when nothing was aligned.",
        "What was found: faces per frame, frames whose eye/mouth hint is empty, the alignment (also shown on the "
        "node).",
        "The driving frame where the face was chosen, every face found boxed and numbered as face_index counts "
        "them (the followed one in green).",
    )
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "reference": (common.REFERENCE_TYPE, {"tooltip": "From X-Portrait Load Reference."}),
                "driving_frames": ("IMAGE", {"tooltip": "The driving video's frames, e.g. from Load Video + Get Video "
                                                        "Components, or VideoHelperSuite's Load Video."}),
                "best_frame": ("INT", {
                    "default": BEST_FRAME_AUTO, "min": NO_ALIGNMENT, "max": 1_000_000,
                    "tooltip": "Driving frame whose head pose is aligned onto the reference's. -1: the frame whose "
                               "landmarks match the reference best (auto). -2: no alignment (the driving face "
                               "stays where it is)."}),
                "track_missed_faces": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Where the face detector misses a frame, look again near a neighbouring frame's face "
                               "instead of leaving that frame's eye/mouth hint empty."}),
            },
            "optional": {
                "face_index": ("INT", {
                    "default": 0, "min": 0, "max": 63,
                    "tooltip": "Which driving face to follow when the video shows several people: 0 is the first "
                               "in face_order (default: the largest) on the first frame with faces; that person "
                               "is then tracked across frames."}),
                "face_order": (list(FACE_ORDERS), {
                    "default": FACE_ORDERS[0],
                    "tooltip": "How faces are numbered for face_index: largest first, or left to right."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def extract(self, reference, driving_frames, best_frame: int = BEST_FRAME_AUTO, track_missed_faces: bool = True,
                face_index: int = 0, face_order: str = FACE_ORDERS[0], unique_id=None):
        node = "X-Portrait Extract Motion"
        checked = common.check_widgets(type(self), {"best_frame": best_frame, "face_index": face_index,
                                                    "face_order": face_order}, node)
        if checked is not True:
            raise ValueError(checked)
        reference = check_reference(reference, node)
        frames = common.image_batch(driving_frames, f"{node}: driving_frames")
        best_frame = int(best_frame)
        if best_frame >= len(frames):
            raise ValueError(f"{node}: best_frame {best_frame} is out of range: the driving video has "
                             f"{len(frames)} frames (use 0..{len(frames) - 1}, -1 for auto or -2 for no alignment)")

        from xportrait_core.faces.landmarks import FaceIndexError
        from xportrait_core.faces.motion_hints import extract_motion

        # Landmark detection is slow on long videos: stop between frames.
        try:
            hints = extract_motion(frames, reference.primary.image, resolution=reference.resolution,
                                   best_frame=best_frame, track_missed_faces=bool(track_missed_faces),
                                   progress=common.interruptible_progress(len(frames)),
                                   face_index=int(face_index), face_order=face_order)
        except FaceIndexError as exc:
            raise ValueError(f"{node}: {exc}") from None
        if not hints.faces_found.any():
            raise ValueError(
                f"{node}: no face was found in any of the {len(frames)} driving frames, so there is no motion to "
                "transfer. Use a driving video showing one face, roughly frontal and not too small (about a fifth "
                "of the frame's height or more); crop a wide video around the face.")
        motion = XPortraitMotion(hints=hints, local_hint=hints.local_hint)
        chosen = NO_ALIGNMENT if hints.best_frame is None else int(hints.best_frame)
        found = int(hints.faces_found.sum())
        lines = [f"Face found in {found} of {len(frames)} driving frames; "
                 + (f"aligned on driving frame {chosen}." if chosen != NO_ALIGNMENT else "not aligned.")]
        faces_image = frames[0]
        if hints.chosen_among is not None:
            from xportrait_core.faces.reference_crop import draw_numbered_faces

            frame_index, faces = hints.chosen_among
            followed = faces[int(face_index)] if int(face_index) < len(faces) else None
            faces_image = draw_numbered_faces(frames[frame_index], faces, followed)
            if len(faces) > 1:
                lines.insert(1, f"{len(faces)} faces in driving frame {frame_index}; following face {int(face_index)} "
                                f"({face_order}): see the 'faces' output")
        lines += [f"Warning: {w}" for w in hints.warnings]
        report = "\n".join(lines)
        return common.with_report((motion, common.hints_to_image(hints.global_hint),
                                   common.hints_to_image(hints.local_hint), chosen, report,
                                   common.to_image(faces_image[..., :3])), lines, unique_id)


class HierarchicalMotionAttention:
    DESCRIPTION = ("Sets how strongly each level of X-Portrait's hierarchical motion control steers the animation: "
                   "the global ControlNet (head pose, whole-face motion) and the local ControlNet (eyes and mouth). "
                   "A strength of 0 turns that ControlNet off exactly. The eye and mouth switches, or a mask, limit "
                   "where the local ControlNet sees the driving face.")
    CATEGORY = common.CATEGORY
    SEARCH_ALIASES = common.SEARCH_ALIASES
    RETURN_TYPES = (common.MOTION_TYPE,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("The motion with these strengths and regions, for the Sampler.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "xportrait_model": (common.MODEL_TYPE, {"tooltip": "The model the motion will drive."}),
                "motion": (common.MOTION_TYPE, {"tooltip": "From X-Portrait Extract Motion."}),
                "global_strength": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                    "tooltip": "Global ControlNet (aligned whole frame: head pose and overall motion). 1 = official, "
                               "0 = off."}),
                "local_strength": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                    "tooltip": "Local ControlNet (eye and mouth patches: blinks, gaze, lips). 1 = official, 0 = off."}),
                "eyes": ("BOOLEAN", {"default": True, "tooltip": "Let the local ControlNet see the driving eyes."}),
                "mouth": ("BOOLEAN", {"default": True, "tooltip": "Let the local ControlNet see the driving mouth."}),
            },
            "optional": {
                "region_mask": ("MASK", {
                    "tooltip": "Where the local ControlNet sees the driving face (white = yes), at any size; one mask "
                               "for every frame or one per frame. Combined with the switches."}),
            },
        }


    def apply(self, xportrait_model, motion, global_strength: float = 1.0, local_strength: float = 1.0,
              eyes: bool = True, mouth: bool = True, region_mask=None):
        node = "X-Portrait Hierarchical Motion Attention"
        from .loader import check_model

        model = check_model(xportrait_model, node)
        motion = check_motion(motion, node)
        # The VAE's downsampling times the UNet's: the pixel multiple the network can take.
        factor = model.config.vae.downsample_factor * 2 ** (len(model.config.unet.channel_mult) - 1)
        if motion.resolution % factor:
            raise ValueError(f"{node}: the motion hints are {motion.resolution}px, not a multiple of {factor}")
        checked = common.check_widgets(type(self), {"global_strength": global_strength,
                                                    "local_strength": local_strength}, node)
        if checked is not True:
            raise ValueError(checked)

        from xportrait_core.faces.motion_regions import restrict_local_hint

        mask = common.mask_batch(region_mask, f"{node}: region_mask")
        local_hint = restrict_local_hint(motion.hints.local_hint, motion.hints.local_boxes, eyes=bool(eyes),
                                         mouth=bool(mouth), mask=mask)
        regions = " and ".join(name for name, on in (("eyes", eyes), ("mouth", mouth)) if on) or "no regions"
        if mask is not None:
            regions += " (masked)"
        return (replace(motion, local_hint=local_hint, global_strength=float(global_strength),
                        local_strength=float(local_strength), regions=regions),)


NODE_CLASS_MAPPINGS = {
    "XPortraitExtractMotion": ExtractMotion,
    "XPortraitHierarchicalMotionAttention": HierarchicalMotionAttention,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "XPortraitExtractMotion": "X-Portrait Extract Motion",
    "XPortraitHierarchicalMotionAttention": "X-Portrait Hierarchical Motion Attention",
}
