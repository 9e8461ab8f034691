"""What a ComfyUI user sees when things go wrong, inside a real ComfyUI: the text of its validation answer (the
dialog), of the execution error in the history, and of the warnings the nodes show (their UI text, kept in the
history), for each problem of issue 20; and that the server keeps serving after every one.

Needs a ComfyUI checkout in COMFYUI_PATH (Python: COMFYUI_PYTHON, else COMFYUI_PATH/venv/bin/python, else this
one). Without it the tests skip, except under CI (`CI` set), where they fail: a CI run without ComfyUI would check
none of this. The server is started once for the module with a temporary --base-directory (ComfyUI's folders are
only read); tests/comfyui_server.py, where present, is the shared way to start one and this module's fixture can
move onto it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from comfyui_server import ComfyUI
from pack_loader import ROOT, tiny_checkpoint_with_text_encoder

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH and not os.environ.get("CI"),
    reason="COMFYUI_PATH is not set: these tests start a real ComfyUI; the same messages are checked in-process in "
           "test_node_messages.py",
)

STARTUP_TIMEOUT = 180
RUN_TIMEOUT = 300
NUM_FRAMES = 4
TINY = "tiny_with_clip.safetensors"


# ---- a ComfyUI server -------------------------------------------------------------------------------------------

class Server(ComfyUI):
    """The shared helper's server (HTTP, log), with the weights these tests load."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path, base: Path, weights: Path):
        super().__init__(url, process, log, base)
        self.weights = weights

    def submit(self, prompt: dict) -> dict:
        """POST /prompt as the frontend does: the answer, with node_errors when validation refused something."""
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})

    def run(self, prompt: dict) -> dict:
        """Queue a prompt every node of which validates; its history entry once finished."""
        answer = self.submit(prompt)
        assert "prompt_id" in answer and not answer.get("node_errors"), json.dumps(answer)[:3000]
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{answer['prompt_id']}").get(answer["prompt_id"])
            if entry and entry.get("status", {}).get("status_str"):
                return entry
            assert self.process.poll() is None, f"ComfyUI exited:\n{self.log_tail()}"
            time.sleep(0.3)
        pytest.fail(f"the prompt did not finish in {RUN_TIMEOUT}s:\n{self.log_tail()}")

    def error(self, prompt: dict) -> str:
        """The execution error a prompt ends with, as the frontend shows it: node type, then the message."""
        entry = self.run(prompt)
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert entry["status"]["status_str"] == "error" and errors, json.dumps(entry["status"])[:3000]
        return f"{errors[0]['node_type']}: {errors[0]['exception_message'].strip()}"

    def assert_serving(self) -> None:
        assert self.process.poll() is None, f"ComfyUI exited:\n{self.log_tail()}"
        assert "XPortraitSampler" in self.get("/object_info/XPortraitSampler")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_people(image: np.ndarray) -> np.ndarray:
    """The image, then a mirrored copy at 3/4 size beside it, on grey."""
    import cv2

    h, w = image.shape[:2]
    small = cv2.resize(image[:, ::-1], (w * 3 // 4, h * 3 // 4), interpolation=cv2.INTER_AREA)
    canvas = np.full((h, w + 32 + small.shape[1], 3), 128, np.uint8)
    canvas[:, :w] = image
    top = (h - small.shape[0]) // 2
    canvas[top:top + small.shape[0], w + 32:] = small
    return canvas


def _write_inputs(inputs: Path, source_image_path: Path, driving_video_path: Path) -> None:
    from PIL import Image

    from xportrait_core.media.video_io import read_video, write_video

    inputs.mkdir(parents=True)
    photo = np.asarray(Image.open(source_image_path).convert("RGB"))
    Image.fromarray(photo).save(inputs / "portrait.png")
    Image.fromarray(_two_people(photo)).save(inputs / "two_people.png")
    Image.new("RGB", (256, 256), (128, 128, 128)).save(inputs / "blank.png")
    frames, fps = read_video(driving_video_path, max_frames=NUM_FRAMES)
    write_video(inputs / "driving.mp4", frames, fps)
    write_video(inputs / "no_face.mp4", np.full((NUM_FRAMES, 128, 128, 3), 128, np.uint8), fps)
    partly = frames.copy()
    partly[1:3] = 128  # two frames without a face
    write_video(inputs / "partly_no_face.mp4", partly, fps)
    write_video(inputs / "two_people.mp4", np.stack([_two_people(f) for f in frames]), fps)


def _write_weights(weights: Path, golden_state_dict_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weights.mkdir(parents=True)
    tiny_checkpoint_with_text_encoder(golden_state_dict_path, weights / TINY)
    state = load_file(str(weights / TINY))
    save_file({**state, "optimizer.step": torch.zeros(1), "extra_head.weight": torch.zeros(2)},
              str(weights / "extra_keys.safetensors"))
    missing = dict(state)
    del missing["global_control.zero_convs.3.0.weight"]
    save_file(missing, str(weights / "missing_key.safetensors"))
    save_file({"weight": torch.zeros(4, 4)}, str(weights / "not_xportrait.safetensors"))
    torch.save(state, weights / "truncated.th")
    data = (weights / "truncated.th").read_bytes()
    (weights / "truncated.th").write_bytes(data[: len(data) // 3])

    class Code:
        def __reduce__(self):
            return (print, ("this would run on load",))

    import pickle

    with open(weights / "training.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"weight": Code()}}, f)
    (weights / "renamed_safetensors.th").write_bytes((weights / TINY).read_bytes())


@pytest.fixture(scope="module")
def server(tmp_path_factory, golden_state_dict_path, source_image_path, driving_video_path):
    if not COMFYUI_PATH:
        pytest.fail("CI is set but COMFYUI_PATH is not: these tests need a ComfyUI checkout")
    comfy = Path(COMFYUI_PATH).resolve()
    if not (comfy / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={COMFYUI_PATH} holds no ComfyUI checkout (no main.py)")
    base = tmp_path_factory.mktemp("comfyui_messages")
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "ComfyUI-XPortrait")
    (base / "models" / "xportrait").mkdir(parents=True)
    weights = base / "weights"
    _write_weights(weights, golden_state_dict_path)
    _write_inputs(base / "input", source_image_path, driving_video_path)
    extra = base / "extra_model_paths.yaml"
    extra.write_text(f"xportrait_messages:\n    xportrait: {weights}\n")
    python = os.environ.get("COMFYUI_PYTHON") or (
        str(comfy / "venv" / "bin" / "python") if (comfy / "venv" / "bin" / "python").exists() else sys.executable)
    port = _free_port()
    log = base / "comfyui.log"
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--extra-model-paths-config", str(extra)]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=comfy, stdout=log_file, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", process, log, base, weights)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited during start-up ({process.returncode}):\n{srv.log_tail()}")
            try:
                srv.get("/object_info/XPortraitSampler")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer in {STARTUP_TIMEOUT}s:\n{srv.log_tail()}")
                time.sleep(0.5)
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


# ---- prompts --------------------------------------------------------------------------------------------------

def example(name: str, model: str = TINY) -> dict:
    """An example API workflow shrunk to the tiny model: 64px, 2 steps, the first frames of the driving video."""
    prompt = json.loads((ROOT / "workflows" / f"{name}_api.json").read_text())
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "XPortraitLoadModel":
            inputs["model_name"] = model
        elif kind == "XPortraitLoadReference":
            inputs["resolution"] = 64
        elif kind == "XPortraitSampler":
            inputs["steps"] = 2
        elif kind == "ImageFromBatch":
            inputs["length"] = NUM_FRAMES
        elif kind == "LoadImage":
            inputs["image"] = "portrait.png"
        elif kind == "LoadVideo":
            inputs["file"] = "driving.mp4"
        elif kind == "SaveVideo":
            inputs["filename_prefix"] = f"messages/{name}"
    return prompt


def loader_only(model: str, **widgets) -> dict:
    """Load Model -> Hierarchical Motion Attention is not an output; feed the model to a Sampler of the basic
    example so the prompt has an output and the loader runs first."""
    prompt = example("xportrait_basic_animation", model)
    prompt["1"]["inputs"].update(widgets)
    return prompt


def reference_and_motion(image: str = "portrait.png", video: str = "driving.mp4", **motion_widgets) -> dict:
    """Load Reference + Extract Motion with their reports shown by Preview Any: runs without the model."""
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "XPortraitLoadReference",
              "inputs": {"image": ["1", 0], "crop_margin": 0.5, "resolution": 64, "mode": "crop"}},
        "3": {"class_type": "LoadVideo", "inputs": {"file": video}},
        "4": {"class_type": "GetVideoComponents", "inputs": {"video": ["3", 0]}},
        "5": {"class_type": "XPortraitExtractMotion",
              "inputs": {"reference": ["2", 0], "driving_frames": ["4", 0], "best_frame": -1,
                         "track_missed_faces": True, **motion_widgets}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 4], "preview": ""}},
    }
    return prompt


def ui_text(entry: dict, node_id: str) -> list[str]:
    return "\n".join(entry["outputs"].get(node_id, {}).get("text", [])).splitlines()


# ---- a missing checkpoint ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["xportrait_basic_animation", "xportrait_multi_reference_identity",
                                  "xportrait_upscale_restore_paste_back"])
def test_a_missing_checkpoint_stops_every_example_at_validation_naming_file_and_folder(server, name):
    answer = server.submit(example(name, model="model_state-415001.th"))
    assert answer.get("http_error") == 400, f"the prompt (or part of it) was queued: {json.dumps(answer)[:2000]}"
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    errors = answer["node_errors"]["1"]["errors"]
    assert len(errors) == 1, errors
    assert errors[0]["details"] == (
        f"model_name - X-Portrait Load Model: model file 'model_state-415001.th' is not in {server.weights} or "
        f"{server.base / 'models' / 'xportrait'}: put it there (the X-Portrait release's model_state-415001.th, or its "
        ".safetensors conversion), then press R in ComfyUI to refresh the list")
    # Only the loader is named: the outputs were refused because they need it, and nothing was queued.
    assert set(answer["node_errors"]) == {"1"} and "prompt_id" not in answer
    server.assert_serving()


# ---- checkpoint files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, expected", [
    ("missing_key.safetensors", "X-Portrait Load Model: missing_key.safetensors does not fit X-Portrait: 1 key "
                                "missing (e.g. global_control.zero_convs.3.0.weight)"),
    ("not_xportrait.safetensors", "X-Portrait Load Model: not_xportrait.safetensors is not an X-Portrait checkpoint "
                                  "of a known size: compared with the closest X-Portrait model, "),
    ("truncated.th", "X-Portrait Load Model: truncated.th is incomplete or damaged (a download that stopped early?): "
                     "download it again"),
    ("training.ckpt", "X-Portrait Load Model: training.ckpt holds Python objects besides the weights (a training "
                      "pickle), and loading those could run code, so it is refused."),
])
def test_bad_checkpoints_are_explained_in_the_users_terms(server, model, expected):
    message = server.error(loader_only(model))
    assert message.startswith(f"XPortraitLoadModel: {expected}"), message
    assert len(message) < 500 and "weights_only" not in message and "miniz" not in message, message
    assert message.count("(e.g. ") <= 2, message
    server.assert_serving()


def test_extra_keys_load_with_one_warning_on_the_node_and_a_renamed_safetensors_loads(server):
    entry = server.run(loader_only("extra_keys.safetensors"))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert ui_text(entry, "1") == ["Warning: 2 extra keys in the checkpoint are not part of X-Portrait and were "
                                   "ignored (e.g. extra_head.weight)"]
    entry = server.run(loader_only("renamed_safetensors.th"))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]


def test_forcing_xformers_on_the_cpu_says_why_and_what_to_choose(server):
    message = server.error(loader_only(TINY, attention="xformers"))
    assert message == ("XPortraitLoadModel: X-Portrait Load Model: attention 'xformers' cannot run: xformers runs on "
                       "NVIDIA GPUs only, and this runs on the CPU. Choose 'auto' (uses xformers where it works) or "
                       "'sdpa'.")


# ---- queue-time checks ----------------------------------------------------------------------------------------

def test_a_resolution_that_is_not_a_multiple_of_64_is_refused_when_queued(server):
    prompt = example("xportrait_basic_animation")
    prompt["3"]["inputs"]["resolution"] = 100
    answer = server.submit(prompt)
    assert answer.get("http_error") == 400, json.dumps(answer)[:2000]
    (error,) = answer["node_errors"]["3"]["errors"]
    assert answer["node_errors"]["3"]["class_type"] == "XPortraitLoadReference"
    assert error["details"] == ("resolution - X-Portrait Load Reference: resolution is 100; it must be a multiple of "
                                "64 (the model's VAE and UNet halve it six times): try 128")


def test_a_nan_guidance_is_refused_naming_the_node(server):
    prompt = example("xportrait_basic_animation")
    prompt["10"]["inputs"]["guidance"] = float("nan")  # JSON NaN: what an API client can send
    message = server.error(prompt)
    assert message == "XPortraitSampler: X-Portrait Sampler: guidance must be a finite number, got nan"
    server.assert_serving()


# ---- faces --------------------------------------------------------------------------------------------------------

def test_a_reference_without_a_face_says_so_and_offers_mode_resize(server):
    message = server.error(reference_and_motion(image="blank.png"))
    assert message.startswith("XPortraitLoadReference: X-Portrait Load Reference: No face was found in the reference "
                              "image (searched the whole 256x256 image)."), message
    assert message.endswith("Mode 'resize' needs no face: it stretches the whole image, as the official demo does.")


def test_a_driving_video_without_a_face_is_an_error(server):
    message = server.error(reference_and_motion(video="no_face.mp4"))
    assert message.startswith(f"XPortraitExtractMotion: X-Portrait Extract Motion: no face was found in any of the "
                              f"{NUM_FRAMES} driving frames, so there is no motion to transfer."), message


def test_driving_frames_without_a_face_are_reported_on_the_node(server):
    entry = server.run(reference_and_motion(video="partly_no_face.mp4"))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    text = ui_text(entry, "5")
    assert text[0].startswith(f"Face found in 2 of {NUM_FRAMES} driving frames; aligned on driving frame")
    assert (f"Warning: No face was found in driving frames 1-2 (2 of {NUM_FRAMES}): their eye/mouth (local) hint is "
            "left empty.") in text
    assert "\n".join(entry["outputs"]["6"]["text"]).splitlines() == text  # the report output says the same


def test_identity_check_without_faces_reports_it_without_nan(server):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "portrait.png"}},
        "2": {"class_type": "XPortraitLoadReference",
              "inputs": {"image": ["1", 0], "crop_margin": 0.5, "resolution": 64, "mode": "crop"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "blank.png"}},
        "4": {"class_type": "XPortraitIdentityCheck", "inputs": {"reference": ["2", 0], "frames": ["3", 0],
                                                                 "threshold": 0.6}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 3], "preview": ""}},
    }
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert ui_text(entry, "4") == ["identity over 1 frame: not measured: no face was found in any frame (are these "
                                   "the animated frames, and do they show a face?)"]
    assert entry["outputs"]["5"]["text"] == ["-1.0"]  # mean_distance: -1, not NaN


def test_face_index_one_animates_the_second_person(server):
    prompt = example("xportrait_basic_animation")
    prompt["2"]["inputs"]["image"] = "two_people.png"
    prompt["5"]["inputs"]["file"] = "two_people.mp4"
    prompt["3"]["inputs"]["face_index"] = 1
    prompt["8"]["inputs"]["face_index"] = 1
    prompt["90"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 4], "preview": ""}}
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert ui_text(entry, "3")[0] == "2 faces found; animating face 1 (largest first): see the 'faces' output"
    motion_text = ui_text(entry, "8")
    assert motion_text[0].startswith(f"Face found in {NUM_FRAMES} of {NUM_FRAMES} driving frames")
    assert motion_text[1] == "2 faces in driving frame 0; following face 1 (largest first): see the 'faces' output"
    server.assert_serving()
