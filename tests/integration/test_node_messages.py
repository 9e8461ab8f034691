"""What a ComfyUI user sees when something is off, called in-process as ComfyUI calls the nodes: queue-time checks
(VALIDATE_INPUTS), errors that start with the node's name, warnings in the node's UI text, non-finite values
refused, and the face chosen among several people. The same messages inside a real ComfyUI are in
test_comfyui_messages.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pack_loader import load_pack, node_classes

RESOLUTION = 64


def run(name: str, **inputs):
    """(outputs, UI text lines) of a node."""
    cls = node_classes()[name]
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    if isinstance(out, dict):
        return out["result"], "\n".join(out["ui"].get("text", [])).splitlines()
    return out, []


NODE_TITLES = {"XPortraitLoadReference": "X-Portrait Load Reference", "XPortraitSampler": "X-Portrait Sampler",
               "XPortraitHierarchicalMotionAttention": "X-Portrait Hierarchical Motion Attention",
               "XPortraitIdentityCheck": "X-Portrait Identity Check", "XPortraitExtractMotion": "X-Portrait Extract Motion",
               "XPortraitPasteBack": "X-Portrait Paste Back"}


def validate(name: str, **values):
    """The node's queue-time check where it has one (VALIDATE_INPUTS), else the check it runs first."""
    cls = node_classes()[name]
    if hasattr(cls, "VALIDATE_INPUTS") and set(values) <= set(__import__("inspect").signature(
            cls.VALIDATE_INPUTS).parameters):
        return cls.VALIDATE_INPUTS(**values)
    return load_pack().nodes.common.check_widgets(cls, values, NODE_TITLES[name])


def as_image(array_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array_uint8).astype(np.float32) / 255.0)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, golden_state_dict_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("models_messages")
    state = load_file(str(golden_state_dict_path))
    save_file({**state, "model_ema.num_updates": torch.tensor(3), "optimizer.step": torch.zeros(1),
               "extra_head.weight": torch.zeros(2)}, str(folder / "tiny_extra_keys.safetensors"))
    del state["pose_control_model.zero_convs.3.0.weight"]
    save_file(state, str(folder / "tiny_missing_key.safetensors"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XPORTRAIT_MODELS_DIR", str(folder))
        yield folder
    from xportrait_core.model.attention import set_attention_backend

    set_attention_backend("auto")


@pytest.fixture(scope="module")
def reference(portrait):
    (ref, _crops, _faces), _ = run("XPortraitLoadReference", image=as_image(portrait)[None], crop_margin=0.5,
                                   resolution=RESOLUTION, mode="crop")
    return ref


# ---- X-Portrait Load Model ------------------------------------------------------------------------------------

def test_extra_keys_load_with_one_warning_on_the_node(models_dir):
    (model, *_comfy_types), text = run("XPortraitLoadModel", model_name="tiny_extra_keys.safetensors",
                                       dtype="fp32", attention="auto")
    assert model.model.text_encoder is None
    # model_ema.* is a known training buffer, ignored silently; the two unknown keys are reported, once.
    assert text == ["Warning: 2 extra keys in the checkpoint are not part of X-Portrait and were ignored (e.g. "
                    "extra_head.weight)"]


def test_a_missing_key_is_refused_naming_it(models_dir):
    with pytest.raises(ValueError) as err:
        run("XPortraitLoadModel", model_name="tiny_missing_key.safetensors", dtype="fp32", attention="auto")
    assert str(err.value) == ("X-Portrait Load Model: tiny_missing_key.safetensors does not fit X-Portrait: 1 key "
                              "missing (e.g. pose_control_model.zero_convs.3.0.weight)")


def test_a_missing_model_file_is_refused_at_queue_time_naming_the_folder(models_dir):
    message = validate("XPortraitLoadModel", model_name="model_state-415001.th")
    assert message == (f"X-Portrait Load Model: model file 'model_state-415001.th' is not in {models_dir}: put it "
                       "there (the X-Portrait release's model_state-415001.th, or its .safetensors conversion), then "
                       "press R in ComfyUI to refresh the list")
    assert validate("XPortraitLoadModel", model_name="tiny_extra_keys.safetensors") is True
    with pytest.raises(ValueError, match="^X-Portrait Load Model: dtype is 'fp8'; choose one of auto, fp16, bf16"):
        run("XPortraitLoadModel", model_name="tiny_extra_keys.safetensors", dtype="fp8", attention="auto")


# ---- queue-time checks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("node, values, message", [
    ("XPortraitLoadReference", dict(resolution=100),
     "X-Portrait Load Reference: resolution is 100; it must be a multiple of 64 (the model's VAE and UNet halve it six "
     "times): try 128"),
    ("XPortraitLoadReference", dict(resolution=4096), "X-Portrait Load Reference: resolution is 4096; it must be "
                                                      "between 64 and 2048"),
    ("XPortraitLoadReference", dict(crop_margin=float("nan")),
     "X-Portrait Load Reference: crop_margin must be a finite number, got nan"),
    ("XPortraitLoadReference", dict(face_order="tallest"),
     "X-Portrait Load Reference: face_order is 'tallest'; choose one of largest first, left to right"),
    ("XPortraitSampler", dict(guidance=float("nan")), "X-Portrait Sampler: guidance must be a finite number"),
    ("XPortraitSampler", dict(guidance=float("inf")), "X-Portrait Sampler: guidance must be a finite number"),
    ("XPortraitSampler", dict(steps=0), "X-Portrait Sampler: steps is 0; it must be between 1 and 1000"),
    ("XPortraitHierarchicalMotionAttention", dict(local_strength=float("nan")),
     "X-Portrait Hierarchical Motion Attention: local_strength must be a finite number"),
    ("XPortraitIdentityCheck", dict(threshold=float("nan")), "X-Portrait Identity Check: threshold must be a finite"),
    ("XPortraitExtractMotion", dict(best_frame=-3), "X-Portrait Extract Motion: best_frame is -3; it must be between "
                                                    "-2 and 1000000"),
    ("XPortraitPasteBack", dict(feather=-2), "X-Portrait Paste Back: feather is -2; it must be between -1 and 4096"),
])
def test_widget_values_are_checked_with_the_nodes_name(node, values, message):
    result = validate(node, **values)
    assert isinstance(result, str) and result.startswith(message), result


def test_valid_widget_values_pass_and_connected_ones_are_left_for_run_time():
    assert validate("XPortraitLoadReference", resolution=512) is True
    assert validate("XPortraitLoadReference", crop_margin=0.5, mode="crop", face_index=1,
                    face_order="left to right") is True
    assert validate("XPortraitSampler", seed=None, steps=None, guidance=None) is True  # connected: None at queue time


# ---- non-finite values ------------------------------------------------------------------------------------------

def test_non_finite_inputs_are_refused_naming_the_input(models_dir, golden_state_dict_path, reference, portrait):
    image = as_image(portrait)[None].clone()
    image[0, 10, 10, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^X-Portrait Load Reference: image holds 1 NaN or infinite values"):
        run("XPortraitLoadReference", image=image, crop_margin=0.5, resolution=RESOLUTION, mode="crop")
    with pytest.raises(ValueError, match=r"^X-Portrait Extract Motion: driving_frames holds 1 NaN"):
        run("XPortraitExtractMotion", reference=reference, driving_frames=image, best_frame=-1,
            track_missed_faces=True)
    with pytest.raises(ValueError, match=r"^X-Portrait Identity Check: frames holds 1 NaN"):
        run("XPortraitIdentityCheck", reference=reference, frames=image, threshold=0.6)
    with pytest.raises(ValueError, match=r"^X-Portrait Paste Back: frames holds 1 NaN"):
        run("XPortraitPasteBack", frames=image, reference=reference, feather=-1)

    common = load_pack().nodes.common
    mask = torch.ones(1, 8, 8)
    mask[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^X-Portrait Hierarchical Motion Attention: region_mask holds 1 NaN"):
        common.mask_batch(mask, "X-Portrait Hierarchical Motion Attention: region_mask")
    sampling = load_pack().nodes.sampling
    context = torch.zeros(1, 77, 32)
    context[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^X-Portrait Sampler: positive holds 1 NaN"):
        sampling._context([[context, {}]], "positive", 32)


def test_non_finite_outputs_are_refused_naming_the_cause():
    common = load_pack().nodes.common
    frames = torch.zeros(2, 8, 8, 3)
    common.check_outputs("X-Portrait Sampler", "overflow", frames=frames)  # finite: nothing to say
    frames[1] = float("nan")
    with pytest.raises(ValueError, match="^X-Portrait Sampler: the frames came out with NaN or infinite values: "
                                         "overflow$"):
        common.check_outputs("X-Portrait Sampler", "overflow", frames=frames)


# ---- faces ----------------------------------------------------------------------------------------------------

def test_no_face_in_the_reference_says_so_counting_from_one_and_offers_resize():
    blank = torch.full((1, 256, 256, 3), 0.5)
    with pytest.raises(ValueError) as err:
        run("XPortraitLoadReference", image=blank, crop_margin=0.5, resolution=RESOLUTION, mode="crop")
    message = str(err.value)
    assert message.startswith("X-Portrait Load Reference: No face was found in the reference image (searched the "
                              "whole 256x256 image). The detector needs")
    assert message.endswith("Mode 'resize' needs no face: it stretches the whole image, as the official demo does.")
    (ref, _crops, _faces), text = run("XPortraitLoadReference", image=blank, crop_margin=0.5, resolution=RESOLUTION,
                                      mode="resize")
    assert ref.primary.face is None and text == [
        "Warning: no face found in the reference (mode resize): Extract Motion will not align the driving face "
        "onto it"]


def test_driving_frames_without_any_face_are_an_error(reference):
    blank = torch.full((3, 128, 128, 3), 0.5)
    with pytest.raises(ValueError, match="^X-Portrait Extract Motion: no face was found in any of the 3 driving "
                                         "frames, so there is no motion to transfer"):
        run("XPortraitExtractMotion", reference=reference, driving_frames=blank, best_frame=-1,
            track_missed_faces=True)


def test_driving_frames_without_a_face_are_reported_on_the_node(reference, driving_frames):
    frames = as_image(driving_frames[:4]).clone()
    frames[1:3] = 0.5  # two flat grey frames
    outputs, text = run("XPortraitExtractMotion", reference=reference, driving_frames=frames, best_frame=-1,
                        track_missed_faces=True)
    report = outputs[4]
    assert report.splitlines() == text
    assert text[0] == f"Face found in 2 of 4 driving frames; aligned on driving frame {outputs[3]}."
    assert "Warning: No face was found in driving frames 1-2 (2 of 4): their eye/mouth (local) hint is left empty." \
        in text


def test_identity_check_without_faces_reports_it_and_never_outputs_nan(reference):
    blank = torch.full((3, 64, 64, 3), 0.5)
    (similarity, report, _plot, distance), text = run("XPortraitIdentityCheck", reference=reference, frames=blank,
                                                      threshold=0.6)
    assert similarity == 0.0 and distance == -1.0
    assert report == ("identity over 3 frames: not measured: no face was found in any frame (are these the animated "
                      "frames, and do they show a face?)")
    assert text == [report] and "nan" not in report.lower() and "None" not in report


# ---- several people: face_index ------------------------------------------------------------------------------------

def _two_people(image: np.ndarray) -> np.ndarray:
    """The image, then beside it a mirrored copy at 3/4 size (so 'largest first' and 'left to right' differ from
    nothing): (H, W + 3W/4 + 32, 3), grey background."""
    import cv2

    h, w = image.shape[:2]
    small = cv2.resize(image[:, ::-1], (w * 3 // 4, h * 3 // 4), interpolation=cv2.INTER_AREA)
    canvas = np.full((h, w + 32 + small.shape[1], 3), 128, np.uint8)
    canvas[:, :w] = image
    top = (h - small.shape[0]) // 2
    canvas[top:top + small.shape[0], w + 32:] = small
    return canvas


def test_face_index_picks_the_second_person_of_a_photo(portrait):
    photo = _two_people(portrait)
    split = portrait.shape[1] + 16  # the gap between the two people
    (first, _, faces_preview), text = run("XPortraitLoadReference", image=as_image(photo)[None], crop_margin=0.5,
                                          resolution=RESOLUTION, mode="crop")
    assert len(first.primary.faces) == 2 and text[0].startswith("2 faces found; animating face 0 (largest first)")
    assert first.primary.crop_box[2] <= split  # default: the largest, on the left
    (second, _, _), _ = run("XPortraitLoadReference", image=as_image(photo)[None], crop_margin=0.5,
                            resolution=RESOLUTION, mode="crop", face_index=1)
    x0, y0, x1, y1 = second.primary.crop_box
    assert x0 >= split - 32, "face 1 (the smaller) is the person on the right"
    (same, _, _), _ = run("XPortraitLoadReference", image=as_image(photo)[None], crop_margin=0.5,
                          resolution=RESOLUTION, mode="crop", face_index=1, face_order="left to right")
    assert same.primary.crop_box == second.primary.crop_box
    # The preview numbers the faces: it differs from the photo inside both face boxes' outlines.
    assert faces_preview.shape == (1, *photo.shape)
    changed = (faces_preview[0].numpy() * 255 - photo).__abs__().max(axis=2) > 40
    for face in first.primary.faces:
        bx0, by0, bx1, by1 = (int(v) for v in face.box)
        assert changed[by0:by1 + 1, bx0:bx1 + 1].any()
    with pytest.raises(ValueError, match=r"^X-Portrait Load Reference: face_index 2 asks for face 3 \(largest first\), "
                                         r"but the reference image has 2 faces: use 0\.\.1"):
        run("XPortraitLoadReference", image=as_image(photo)[None], crop_margin=0.5, resolution=RESOLUTION,
            mode="crop", face_index=2)


def test_face_index_follows_the_second_person_of_a_video(reference, driving_frames):
    frames = np.stack([_two_people(f) for f in driving_frames[:3]])
    width = frames.shape[2]
    split = (driving_frames.shape[2] + 16) / width  # where the right person starts, as a fraction of the width
    hints = {}
    for index in (0, 1):
        (motion, *_rest, faces_preview), text = run("XPortraitExtractMotion", reference=reference,
                                                    driving_frames=as_image(frames), best_frame=-2,
                                                    track_missed_faces=True, face_index=index)
        hints[index] = motion.hints
        assert text[1] == f"2 faces in driving frame 0; following face {index} (largest first): see the 'faces' output"
        assert faces_preview.shape == (1, *frames.shape[1:])
    for index, hint in hints.items():
        assert hint.faces_found.all() and hint.chosen_among[0] == 0 and len(hint.chosen_among[1]) == 2
        centres = hint.local_boxes[:, :, [0, 2]].mean(axis=(1, 2)) / RESOLUTION  # eyes and mouth, per frame
        if index == 0:
            assert (centres < split).all(), centres
        else:
            assert (centres > split).all(), centres
    # Aligned (best frame searched), the chosen person is the one warped onto the reference's face: the global
    # hints of face 1 come from the right half of the frames, those of face 0 from the left half.
    aligned = {}
    for index in (0, 1):
        (motion, *_rest), _ = run("XPortraitExtractMotion", reference=reference, driving_frames=as_image(frames),
                                  best_frame=-1, track_missed_faces=True, face_index=index)
        aligned[index] = motion.hints
    for index, hint in aligned.items():
        x0, _y0, x1, _y1 = hint.aligned_faces[0].box
        assert hint.best_frame is not None
        # The affine's inverse takes the aligned face centre back to the driving frame: left or right person.
        inverse = np.linalg.inv(np.vstack([hint.affine, [0, 0, 1]]))
        centre = inverse @ np.array([(x0 + x1) / 2, RESOLUTION / 2, 1.0])
        assert (centre[0] / RESOLUTION > split) == (index == 1), (index, centre)


def test_face_index_beyond_the_faces_of_the_video_is_a_clear_error(reference, driving_frames):
    with pytest.raises(ValueError, match=r"^X-Portrait Extract Motion: face_index 3 asks for face 4 \(largest first\), "
                                         r"but driving frame 0 has 1 face: use 0"):
        run("XPortraitExtractMotion", reference=reference, driving_frames=as_image(driving_frames[:2]),
            best_frame=-2, track_missed_faces=True, face_index=3)

