"""The pack inside a real ComfyUI: started headless on 127.0.0.1, the example API workflows queued with tiny weights.

Needs a ComfyUI checkout in COMFYUI_PATH (CI cannot fetch one, so there the test is skipped, saying why). Its
Python is COMFYUI_PYTHON, else COMFYUI_PATH/venv/bin/python, else this one. Everything the run writes goes to a
temporary --base-directory: the pack is linked into its custom_nodes/, the weights sit in a folder named by an
extra_model_paths.yaml (so that support is exercised too), and the sample assets are copied into its input/.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from media import video_with_sound
from pack_loader import ROOT, tiny_checkpoint_with_text_encoder

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH,
    reason="COMFYUI_PATH is not set: these tests need a ComfyUI checkout to start (see workflows/ and "
           "notes on running ComfyUI headless); the nodes themselves are tested in test_nodes.py",
)

STARTUP_TIMEOUT = 180
RUN_TIMEOUT = 300
NUM_FRAMES = 6
NODE_TYPES = {"XPortraitLoadModel", "XPortraitLoadReference", "XPortraitExtractMotion",
              "XPortraitHierarchicalMotionAttention", "XPortraitSampler", "XPortraitIdentityCheck",
              "XPortraitPasteBack", "XPortraitWriteVideo", "XPortraitConditioning"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _python(comfy: Path) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = comfy / "venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path, base: Path):
        self.url, self.process, self.log, self.base = url, process, log, base

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return json.loads(body) if body.strip() else {}
        except urllib.error.HTTPError as error:  # a prompt refused by validation: return ComfyUI's answer
            return {"http_error": error.code, **json.loads(error.read() or b"{}")}

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def run(self, prompt: dict, client_id: str | None = None) -> dict:
        """Queue an API-format prompt and wait for its history entry."""
        answer = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        assert "prompt_id" in answer, f"ComfyUI refused the prompt: {json.dumps(answer)[:2000]}"
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
                return entry
            assert self.process.poll() is None, f"ComfyUI exited:\n{self.log_tail()}"
            time.sleep(0.5)
        pytest.fail(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT}s:\n{self.log_tail()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, golden_state_dict_path, source_image_path, driving_video_path):
    comfy = Path(COMFYUI_PATH).resolve()
    if not (comfy / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={COMFYUI_PATH} holds no ComfyUI checkout (no main.py)")
    base = tmp_path_factory.mktemp("comfyui_base")
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "ComfyUI-XPortrait")
    (base / "models" / "xportrait").mkdir(parents=True)  # the default folder stays empty
    weights = tmp_path_factory.mktemp("xportrait_weights")
    tiny_checkpoint_with_text_encoder(golden_state_dict_path, weights / "tiny_with_clip.safetensors")
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(4, 4)}, str(weights / "not_xportrait.safetensors"))
    (weights / "notes.txt").write_text("not a checkpoint: must not be listed")
    extra = base / "extra_model_paths.yaml"
    extra.write_text(f"xportrait_tests:\n    xportrait: {weights}\n")

    inputs = base / "input"
    inputs.mkdir()
    from PIL import Image, ImageOps

    photo = Image.open(source_image_path).convert("RGB")
    photo.save(inputs / "xportrait_reference.png")
    ImageOps.mirror(photo).save(inputs / "xportrait_reference_2.png")
    Image.new("RGB", (256, 256), (128, 128, 128)).save(inputs / "blank.png")
    shutil.copy(driving_video_path, inputs / "xportrait_driving.mp4")

    port = _free_port()
    log = base / "comfyui.log"
    command = [_python(comfy), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--extra-model-paths-config", str(extra), "--preview-method", "latent2rgb"]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=comfy, stdout=log_file, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", process, log, base)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited during start-up ({process.returncode}):\n{srv.log_tail()}")
            try:
                srv.object_info = srv.get("/object_info")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer /object_info in {STARTUP_TIMEOUT}s:\n{srv.log_tail()}")
                time.sleep(0.5)
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


def _workflow(name: str) -> dict:
    return json.loads((ROOT / "workflows" / f"{name}_api.json").read_text())


def tiny_prompt(name: str, model: str = "tiny_with_clip.safetensors") -> dict:
    """An example workflow shrunk to the tiny model: 64px, 2 steps, the first frames of the driving video."""
    prompt = _workflow(name)
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
        elif kind == "SaveVideo":
            inputs["filename_prefix"] = f"tests/{name}"
    return prompt


def test_the_pack_loads_and_lists_its_models(server):
    info = server.object_info
    missing = NODE_TYPES - set(info)
    assert not missing, f"nodes not registered: {missing}\n{server.log_tail()}"
    assert all(info[n]["category"] == "X-Portrait" for n in NODE_TYPES)
    choices = info["XPortraitLoadModel"]["input"]["required"]["model_name"][0]
    assert choices == ["not_xportrait.safetensors", "tiny_with_clip.safetensors"], "extra_model_paths + extensions"
    assert "IMPORT FAILED" not in server.log.read_text() or "ComfyUI-XPortrait" not in server.log.read_text().split(
        "IMPORT FAILED", 1)[1]


def test_core_nodes_match_the_snapshot_the_workflow_tests_use(server):
    """tests/test_workflows.py validates core nodes against a snapshot: it must agree with this ComfyUI."""
    snapshot = json.loads((ROOT / "tests" / "fixtures" / "comfyui_core_nodes.json").read_text())["nodes"]
    used = {node["class_type"] for path in (ROOT / "workflows").glob("*_api.json")
            for node in json.loads(path.read_text()).values()}
    for name in sorted(used - NODE_TYPES):
        live, snap = server.object_info[name], snapshot[name]
        assert live["output"] == snap["output"], name
        for group in ("required", "optional"):
            live_inputs, snap_inputs = live["input"].get(group, {}), snap["input"].get(group, {})
            assert list(live_inputs) == list(snap_inputs), f"{name} {group} inputs changed"
            for key in live_inputs:
                kind = lambda e: "COMBO" if isinstance(e[0], list) else e[0]
                assert kind(live_inputs[key]) == kind(snap_inputs[key]), f"{name}.{key} changed type"


def _saved_video(server, entry: dict) -> Path:
    """The mp4 a prompt's Save Video wrote."""
    videos = [item for output in entry["outputs"].values() for item in output.get("images", [])
              if item.get("filename", "").endswith(".mp4")]
    assert videos, f"no video saved: {json.dumps(entry['outputs'])[:2000]}"
    return server.base / "output" / videos[0].get("subfolder", "") / videos[0]["filename"]


def _assert_succeeded(server, entry: dict, what: str = "") -> None:
    status = entry["status"]
    assert status["status_str"] == "success", (
        f"{what} failed: {json.dumps(status['messages'])[:3000]}\n{server.log_tail()}")


@pytest.mark.parametrize("name", ["xportrait_basic_animation", "xportrait_multi_reference_identity",
                                  "xportrait_upscale_restore_paste_back"])
def test_example_workflow_runs(server, name):
    entry = server.run(tiny_prompt(name))
    _assert_succeeded(server, entry, name)
    saved = _saved_video(server, entry)
    assert saved.is_file() and saved.stat().st_size > 0
    import av

    with av.open(str(saved)) as container:
        stream = container.streams.video[0]
        frames = [frame for frame in container.decode(stream)]
    assert len(frames) == NUM_FRAMES
    # The Sampler's 64px crops, or (after upscaling and paste-back) the full 512x512 sample photo.
    expected = (512, 512) if name == "xportrait_upscale_restore_paste_back" else (64, 64)
    assert (frames[0].height, frames[0].width) == expected
    texts = [t for output in entry["outputs"].values() for t in output.get("text", [])]
    if name != "xportrait_basic_animation":
        assert any(f"identity over {NUM_FRAMES} frames" in t for t in texts), texts


def test_the_lcm_lora_sampler_workflow_runs(server, golden_state_dict_path):
    """X-Portrait Load LoRA and the Sampler's lcm in a real ComfyUI; a LoRA written for the tiny UNet stands in for
    the LCM-LoRA file in models/loras."""
    from lora_files import write_kohya_lora

    from xportrait_core.model.checkpoint import load_xportrait

    prompt = tiny_prompt("xportrait_lcm_lora_sampler")
    (lora_name,) = [n["inputs"]["lora_name"] for n in prompt.values() if n["class_type"] == "XPortraitLoadLoRA"]
    assert [n["inputs"]["sampler"] for n in prompt.values() if n["class_type"] == "XPortraitSampler"] == ["lcm"]
    folder = server.base / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    write_kohya_lora(folder / lora_name, load_xportrait(golden_state_dict_path).unet, rank=4, alpha=4.0, seed=0)
    entry = server.run(prompt)
    _assert_succeeded(server, entry, "xportrait_lcm_lora_sampler")
    frames = _saved_frames(server, entry)
    assert frames.shape == (NUM_FRAMES, 64, 64, 3)
    assert frames.std() > 1.0, "the frames are not flat"


def _saved_frames(server, entry: dict):
    import av
    import numpy as np

    with av.open(str(_saved_video(server, entry))) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def test_low_vram_mode_runs_under_comfyui_model_management_and_gives_the_same_frames(server):
    """vram: low hands ComfyUI's ModelPatcher only the networks kept on the GPU; the job still runs through
    load_models_gpu and gives the frames of the normal mode."""
    frames = {}
    for vram in ("normal", "low"):
        prompt = tiny_prompt("xportrait_basic_animation")
        for node in prompt.values():
            if node["class_type"] == "XPortraitLoadModel":
                node["inputs"]["vram"] = vram
            elif node["class_type"] == "SaveVideo":
                node["inputs"]["filename_prefix"] = f"tests/vram_{vram}"
        entry = server.run(prompt)
        _assert_succeeded(server, entry, f"vram {vram}")
        frames[vram] = _saved_frames(server, entry).astype(int)
    assert frames["low"].shape == frames["normal"].shape == (NUM_FRAMES, 64, 64, 3)
    assert abs(frames["low"] - frames["normal"]).max() <= 2  # the same frames, through the same video encoder


def test_the_saved_animation_carries_the_driving_videos_sound(server):
    """A talking head keeps its voice: the example workflow passes the driving video's audio to Create Video,
    and the animation (one frame per driving frame) lasts as long as it."""
    import av

    duration = video_with_sound(server.base / "input" / "xportrait_driving.mp4",
                                 server.base / "input" / "talking.mp4", NUM_FRAMES)
    prompt = tiny_prompt("xportrait_basic_animation")
    for node in prompt.values():
        if node["class_type"] == "LoadVideo":
            node["inputs"]["file"] = "talking.mp4"
        elif node["class_type"] == "SaveVideo":
            node["inputs"]["filename_prefix"] = "tests/talking"
    entry = server.run(prompt)
    _assert_succeeded(server, entry)
    with av.open(str(_saved_video(server, entry))) as container:
        assert len(container.streams.audio) == 1, "the animation has no sound"
        sound = sum(f.samples for f in container.decode(container.streams.audio[0])) / 44100
        container.seek(0)
        frames = sum(1 for _ in container.decode(container.streams.video[0]))
    assert frames == NUM_FRAMES
    assert abs(sound - duration) < 0.1, (sound, duration)


def test_the_streaming_writer_pastes_back_with_the_driving_videos_rate_and_sound(server):
    """X-Portrait Write Video takes the Sampler's LATENT and Load Video's VIDEO: the full photo's frames, one per
    driving frame, at the driving video's frame rate and with its voice, in ComfyUI's output folder."""
    import av

    duration = video_with_sound(server.base / "input" / "xportrait_driving.mp4",
                                server.base / "input" / "talking_streamed.mp4", NUM_FRAMES)
    prompt = tiny_prompt("xportrait_basic_animation")
    for node in prompt.values():
        if node["class_type"] == "LoadVideo":
            node["inputs"]["file"] = "talking_streamed.mp4"
        elif node["class_type"] == "SaveVideo":
            node["inputs"]["filename_prefix"] = "tests/before_streamed"
    loader, reference, video, sampler = (next(k for k, n in prompt.items() if n["class_type"] == kind) for kind in
                                         ("XPortraitLoadModel", "XPortraitLoadReference", "LoadVideo",
                                          "XPortraitSampler"))
    prompt["streamed"] = {"class_type": "XPortraitWriteVideo", "inputs": {
        "xportrait_model": [loader, 0], "latent": [sampler, 1], "filename_prefix": "tests/streamed", "fps": 25.0,
        "paste_back": True, "decode_chunk": 4, "reference": [reference, 0], "driving_video": [video, 0]}}
    entry = server.run(prompt)
    _assert_succeeded(server, entry, "Write Video")
    item = entry["outputs"]["streamed"]["images"][0]
    path = server.base / "output" / item["subfolder"] / item["filename"]
    assert item["type"] == "output" and path.is_file()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert float(stream.average_rate) == pytest.approx(12000 / 1001, abs=0.01)
        frames = [f for f in container.decode(stream)]
        container.seek(0)
        sound = sum(f.samples for f in container.decode(container.streams.audio[0])) / 44100
    assert len(frames) == NUM_FRAMES and (frames[0].height, frames[0].width) == (512, 512)  # the photo's size
    assert abs(sound - duration) < 0.1, (sound, duration)


class PreviewListener:
    """ComfyUI's websocket for one client id, read on a thread (a minimal RFC 6455 client: the test's Python may
    have no websocket package): keeps the preview images ComfyUI sends as binary messages."""

    PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE: 4-byte event, 4-byte image format, image bytes

    def __init__(self, url: str, client_id: str):
        import base64
        import threading

        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += self.sock.recv(1)
        assert answer.startswith(b"HTTP/1.1 101"), answer
        self.previews: list[bytes] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("websocket closed")
            data += chunk
        return data

    def _read(self):
        import struct

        try:
            while True:
                first, second = self._exactly(2)
                length = second & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._exactly(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._exactly(8))[0]
                payload = self._exactly(length)
                opcode = first & 0x0F
                if opcode == 8:  # close
                    return
                if opcode == 2 and struct.unpack(">I", payload[:4])[0] == self.PREVIEW_IMAGE:
                    self.previews.append(payload[8:])
        except (OSError, ConnectionError):
            return

    def close(self):
        self.sock.close()


def test_the_sampler_sends_previews_to_the_comfyui_frontend(server):
    """Started with --preview-method latent2rgb, ComfyUI shows the Sampler's x_0 while it samples: a preview
    image reaches the frontend's websocket at every step, four frames side by side."""
    import io

    from PIL import Image

    client_id = uuid.uuid4().hex
    listener = PreviewListener(server.url, client_id)
    try:
        prompt = tiny_prompt("xportrait_basic_animation")
        for node in prompt.values():
            if node["class_type"] == "XPortraitSampler":
                node["inputs"]["steps"] = 3
            elif node["class_type"] == "SaveVideo":
                node["inputs"]["filename_prefix"] = "tests/previews"
        entry = server.run(prompt, client_id=client_id)
        _assert_succeeded(server, entry, "the previewed run")
        time.sleep(1.0)  # the last messages in flight
    finally:
        listener.close()
    assert len(listener.previews) >= 3, f"{len(listener.previews)} previews\n{server.log_tail()}"
    width, height = Image.open(io.BytesIO(listener.previews[-1])).size
    assert width == 4 * height


def test_a_second_sampler_can_start_from_the_first_ones_frames(server):
    """Chaining: Sampler -> (frames as init_frames, 'noised init frames') -> Sampler -> Create Video runs in
    ComfyUI, e.g. to refine another animator's output of the same crop."""
    prompt = tiny_prompt("xportrait_basic_animation")
    (sampler_id,) = [k for k, node in prompt.items() if node["class_type"] == "XPortraitSampler"]
    second = json.loads(json.dumps(prompt[sampler_id]))
    second["inputs"].update(initial_latents="noised init frames", init_frames=[sampler_id, 0], seed=5)
    prompt["99"] = second
    for node in prompt.values():
        if node["class_type"] == "CreateVideo":
            node["inputs"]["images"] = ["99", 0]
        elif node["class_type"] == "SaveVideo":
            node["inputs"]["filename_prefix"] = "tests/refined"
    entry = server.run(prompt)
    _assert_succeeded(server, entry)
    assert _saved_frames(server, entry).shape == (NUM_FRAMES, 64, 64, 3)


def _error_message(entry: dict) -> str:
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors, entry["status"]
    return f"{errors[0]['node_type']}: {errors[0]['exception_message']}"


def test_no_face_is_a_comfyui_error_with_a_clear_message(server):
    prompt = tiny_prompt("xportrait_basic_animation")
    for node in prompt.values():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = "blank.png"
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    message = _error_message(entry)
    assert message.startswith("XPortraitLoadReference: X-Portrait Load Reference: No face was found in the reference "
                              "image"), message


def test_wrong_model_file_is_a_comfyui_error_with_a_clear_message(server):
    entry = server.run(tiny_prompt("xportrait_basic_animation", model="not_xportrait.safetensors"))
    assert entry["status"]["status_str"] == "error"
    message = _error_message(entry)
    assert message.startswith("XPortraitLoadModel: X-Portrait Load Model: not_xportrait.safetensors is not an "
                              "X-Portrait checkpoint"), message


def test_cancel_stops_the_sampler_between_model_calls(server):
    """ComfyUI's Cancel (POST /interrupt) stops a long sampling run within a model call, as an interruption."""
    prompt = tiny_prompt("xportrait_basic_animation")
    for node in prompt.values():
        if node["class_type"] == "XPortraitSampler":
            node["inputs"]["steps"] = 1000  # minutes of work at this size if nothing stopped it
    answer = server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.get("/queue")["queue_running"] == []:
        time.sleep(0.2)
    time.sleep(3.0)  # the upstream nodes are cached from earlier runs: by now the Sampler is sampling
    interrupted_at = time.monotonic()
    server.post("/interrupt", {})
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("status_str"):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the interrupted prompt did not finish:\n{server.log_tail()}")
    assert time.monotonic() - interrupted_at < 20
    kinds = {m[0]: m[1] for m in entry["status"]["messages"]}
    assert "execution_interrupted" in kinds and "execution_error" not in kinds, entry["status"]
    assert kinds["execution_interrupted"]["node_type"] == "XPortraitSampler"


def _playwright_dir() -> Path | None:
    """A folder whose node_modules holds playwright-core: PLAYWRIGHT_DIR, else none."""
    folder = os.environ.get("PLAYWRIGHT_DIR")
    if folder and (Path(folder) / "node_modules" / "playwright-core").is_dir():
        return Path(folder)
    return None


def test_ui_workflows_load_in_the_frontend_and_queue_the_api_files(server):
    """In ComfyUI's own frontend: no missing node types, graphToPrompt gives exactly the API-format file, and the
    graph saves back with the same inputs, links and widget values."""
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    folder = _playwright_dir()
    if shutil.which("node") is None or not Path(chromium).exists() or folder is None:
        pytest.skip("the frontend check needs node, Chromium (CHROMIUM, default /usr/bin/chromium) and "
                    "playwright-core installed under PLAYWRIGHT_DIR (npm install playwright-core there)")
    files = sorted(p for p in (ROOT / "workflows").glob("*.json") if not p.name.endswith("_api.json"))
    out = subprocess.run(["node", str(ROOT / "tests" / "frontend_roundtrip.js"), server.url + "/", *map(str, files)],
                         capture_output=True, text=True, timeout=300, cwd=folder,
                         env={**os.environ, "NODE_PATH": str(folder / "node_modules")})
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    for path in files:
        result = results[str(path)]
        assert result["missing"] == [], f"{path.name}: node types unknown to the frontend: {result['missing']}"
        api = json.loads((ROOT / "workflows" / f"{path.stem}_api.json").read_text())
        assert result["output"] == api, f"{path.name}: the UI queues something else than {path.stem}_api.json"
        mine = json.loads(path.read_text())

        def shape(graph):
            return ({n["id"]: ([(i["name"], i["type"], i["link"]) for i in n.get("inputs", [])],
                               n.get("widgets_values")) for n in graph["nodes"]},
                    sorted(map(tuple, graph["links"])))

        assert shape(result["saved"]) == shape(mine), f"{path.name}: the frontend saves a different graph"
