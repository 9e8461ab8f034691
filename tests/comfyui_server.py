"""A real ComfyUI for the tests: started once per test session, headless on 127.0.0.1, with the pack linked in.

Any test can take the `comfyui` fixture (registered in tests/conftest.py) and mark itself `@pytest.mark.comfyui`
(or put `pytestmark = comfyui_tests` in its module). What it gets, a `ComfyUI`, speaks ComfyUI's HTTP API: queue a
prompt and wait for its history entry (`run`, `run_ok`, `execution_error`), ask for validation only (`validate`),
and listen to its websocket (`Events`). `tiny_prompt` shrinks an example API workflow to the tiny weights.

Where ComfyUI comes from: COMFYUI_PATH (a ComfyUI checkout; it is only read, never written) run by COMFYUI_PYTHON,
else COMFYUI_PATH/venv/bin/python, else this Python. Without COMFYUI_PATH the tests skip, except under CI (`CI`
set), where they fail: .ci/run always provides ComfyUI, so a skip there would hide that nothing was checked.
Everything the server writes goes to a temporary --base-directory: the pack is linked into its custom_nodes/, the
weights sit in a folder named by an extra_model_paths.yaml (so that support is exercised too), and the sample
assets and the bad inputs the error tests need are written into its input/.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")

STARTUP_TIMEOUT = 180
RUN_TIMEOUT = 300
# The tiny size every example workflow is shrunk to: 64px crops, 2 DDIM steps, the first 6 driving frames.
TINY_RESOLUTION = 64
TINY_STEPS = 2
NUM_FRAMES = 6
TINY_MODEL = "tiny_with_clip.safetensors"
PACK_MODULE = "custom_nodes.ComfyUI-XPortrait"  # how ComfyUI's /object_info names the module of our nodes

comfyui_tests = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_PATH and not os.environ.get("CI"),
                       reason="COMFYUI_PATH is not set: these tests start a real ComfyUI from that checkout (see "
                              "docs/ci.md); the nodes themselves are tested in tests/integration/test_nodes.py"),
]


def example_workflows() -> list[Path]:
    """Every API-format example workflow (new ones are picked up by the tests that iterate over them)."""
    return sorted(WORKFLOWS.glob("*_api.json"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def comfyui_checkout() -> Path:
    """The ComfyUI to start; a missing one fails the test (its absence was already a skip outside CI)."""
    if not COMFYUI_PATH:
        pytest.fail("CI is set but COMFYUI_PATH is not: .ci/run points it at a scratch copy of ../shared/comfyui "
                    "(a CI run without ComfyUI would check none of the pack inside it)")
    comfy = Path(COMFYUI_PATH).resolve()
    if not (comfy / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={COMFYUI_PATH} holds no ComfyUI checkout (no main.py)")
    return comfy


def comfyui_python(comfy: Path) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = comfy / "venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class ComfyUI:
    """A running ComfyUI server and the folder it writes to."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path, base: Path):
        self.url, self.process, self.log, self.base = url, process, log, base
        self.object_info: dict = {}

    # ---- HTTP -----------------------------------------------------------------------------------------------
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        """POST JSON; an HTTP error (e.g. a prompt refused by validation) returns ComfyUI's answer with its code."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return json.loads(body) if body.strip() else {}
        except urllib.error.HTTPError as error:
            return {"http_error": error.code, **json.loads(error.read() or b"{}")}

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    # ---- prompts --------------------------------------------------------------------------------------------
    def validate(self, prompt: dict) -> dict:
        """ComfyUI's answer to POST /prompt as the frontend gets it: {"http_error": 400, "error": ...,
        "node_errors": {node id: {"errors": [...], "class_type": ...}}} when no output can run; else the
        "prompt_id" and the "node_errors" of the outputs it left out (ComfyUI queues the outputs that passed
        validation: this waits until they ran, so that the next test finds an idle server)."""
        answer = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if "prompt_id" in answer:
            self.wait(answer["prompt_id"])
        return answer

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """Queue a prompt every node of which must pass ComfyUI's validation; its prompt id."""
        answer = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        assert "prompt_id" in answer and not answer.get("node_errors"), (
            f"ComfyUI refused the prompt (or some of its outputs): {json.dumps(answer)[:3000]}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT) -> dict:
        """The prompt's history entry once it finished (success, error or interruption)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str"):
                return entry
            assert self.process.poll() is None, f"ComfyUI exited:\n{self.log_tail()}"
            time.sleep(0.2)
        pytest.fail(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def run(self, prompt: dict, client_id: str | None = None) -> dict:
        """Queue an API-format prompt and wait for its history entry."""
        return self.wait(self.queue(prompt, client_id))

    def run_ok(self, prompt: dict, what: str = "the prompt", client_id: str | None = None) -> dict:
        entry = self.run(prompt, client_id)
        status = entry["status"]
        assert status["status_str"] == "success", (
            f"{what} failed: {json.dumps(status['messages'])[:3000]}\n{self.log_tail()}")
        return entry

    def execution_error(self, prompt: dict) -> dict:
        """Run a prompt that must fail; its `execution_error` message (node_type, exception_message, ...)."""
        entry = self.run(prompt)
        status = entry["status"]
        errors = [data for kind, data in status["messages"] if kind == "execution_error"]
        assert status["status_str"] == "error" and errors, f"expected an execution_error: {json.dumps(status)[:3000]}"
        return errors[0]

    def assert_serving(self) -> None:
        """The server is still up, answers, and has nothing stuck in its queue."""
        assert self.process.poll() is None, f"ComfyUI exited:\n{self.log_tail()}"
        assert "system" in self.get("/system_stats")
        queue = self.get("/queue")
        assert queue["queue_running"] == [] and queue["queue_pending"] == [], queue

    # ---- outputs --------------------------------------------------------------------------------------------
    def saved_files(self, entry: dict, suffix: str = "") -> list[Path]:
        """The files a prompt's output nodes wrote to output/ (not the temp/ previews), ending in `suffix`."""
        items = [item for output in entry["outputs"].values() for values in output.values()
                 if isinstance(values, list) for item in values
                 if isinstance(item, dict) and item.get("type") == "output" and "filename" in item]
        return [self.base / "output" / item.get("subfolder", "") / item["filename"] for item in items
                if item["filename"].endswith(suffix)]

    def saved_video(self, entry: dict) -> Path:
        videos = self.saved_files(entry, ".mp4")
        assert videos, f"no video saved: {json.dumps(entry['outputs'])[:2000]}"
        return videos[0]

    def saved_frames(self, entry: dict):
        """The frames of the video the prompt saved, uint8 (N, H, W, 3)."""
        import av
        import numpy as np

        with av.open(str(self.saved_video(entry))) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


class Events:
    """ComfyUI's websocket for one client id, read on a thread: a minimal RFC 6455 client, since the tests' Python
    need not have a websocket package. Keeps every JSON message as (arrival time, type, data) and the preview
    images ComfyUI sends as binary messages. Use as a context manager; pass `.client_id` when queueing."""

    PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE: 4-byte event, 4-byte image format, image bytes

    def __init__(self, server: ComfyUI):
        self.client_id = uuid.uuid4().hex
        self.messages: list[tuple[float, str, dict]] = []
        self.previews: list[bytes] = []
        self._changed = threading.Condition()
        host, port = server.url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={self.client_id} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += self.sock.recv(1)
        assert answer.startswith(b"HTTP/1.1 101"), answer
        self.sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        # ComfyUI greets a new socket with its status: after it, events for this client id reach this socket.
        self.wait_for(lambda kind, data: kind == "status", timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("websocket closed")
            data += chunk
        return data

    def _read(self):
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
                with self._changed:
                    if opcode == 1:
                        message = json.loads(payload)
                        self.messages.append((time.monotonic(), message.get("type"), message.get("data") or {}))
                    elif opcode == 2 and struct.unpack(">I", payload[:4])[0] == self.PREVIEW_IMAGE:
                        self.previews.append(payload[8:])
                    self._changed.notify_all()
        except (OSError, ConnectionError, ValueError):
            return

    def wait_for(self, matches, timeout: float = RUN_TIMEOUT) -> tuple[float, str, dict]:
        """The first message (time, type, data) for which matches(type, data) is true, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for message in self.messages:
                    if matches(message[1], message[2]):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [kind for _, kind, _ in self.messages]
                    pytest.fail(f"no such websocket message in {timeout}s; got {kinds}")
                self._changed.wait(left)

    def of_prompt(self, prompt_id: str) -> list[tuple[float, str, dict]]:
        with self._changed:
            return [m for m in self.messages if m[2].get("prompt_id") == prompt_id]

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def start_comfyui(comfy: Path, base: Path, extra_model_paths: Path | None = None) -> ComfyUI:
    """Start `comfy`'s main.py on CPU on a free 127.0.0.1 port, writing only under `base`; wait for /object_info."""
    port = _free_port()
    log = base / "comfyui.log"
    command = [comfyui_python(comfy), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--preview-method", "latent2rgb"]
    if extra_model_paths:
        command += ["--extra-model-paths-config", str(extra_model_paths)]
    # No .pyc files beside a checkout that may be shared (it is only read).
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=comfy, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = ComfyUI(f"http://127.0.0.1:{port}", process, log, base)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            pytest.fail(f"ComfyUI exited during start-up ({process.returncode}):\n{server.log_tail()}")
        try:
            server.object_info = server.get("/object_info")
            return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                stop_comfyui(server)
                pytest.fail(f"ComfyUI did not answer /object_info in {STARTUP_TIMEOUT}s:\n{server.log_tail()}")
            time.sleep(0.5)


def stop_comfyui(server: ComfyUI) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=20)


def _prepare_base(base: Path, weights: Path, golden_state_dict_path: Path, source_image_path: Path,
                  driving_video_path: Path) -> Path:
    """Fill the scratch base directory and weights folder; returns the extra_model_paths.yaml to pass."""
    import torch
    from PIL import Image, ImageOps
    from safetensors.torch import load_file, save_file

    from pack_loader import tiny_checkpoint_with_text_encoder

    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "ComfyUI-XPortrait")
    (base / "custom_nodes" / "xportrait_test_nodes.py").write_text(TEST_NODES)
    (base / "models" / "xportrait").mkdir(parents=True)  # the default folder stays empty

    tiny = tiny_checkpoint_with_text_encoder(golden_state_dict_path, weights / TINY_MODEL)
    save_file({"weight": torch.zeros(4, 4)}, str(weights / "not_xportrait.safetensors"))
    # A download cut short: the official format (.th, a torch zip) and safetensors, each half of a good file.
    official = weights / "official_format.th"
    torch.save(load_file(str(golden_state_dict_path)), str(official))
    for good, cut in ((official, "truncated.th"), (tiny, "truncated.safetensors")):
        data = good.read_bytes()
        (weights / cut).write_bytes(data[:len(data) // 2])
    (weights / "notes.txt").write_text("not a checkpoint: must not be listed")
    _tiny_loras(base / "models" / "loras")
    extra = base / "extra_model_paths.yaml"
    extra.write_text(f"xportrait_tests:\n    xportrait: {weights}\n")

    inputs = base / "input"
    inputs.mkdir()
    photo = Image.open(source_image_path).convert("RGB")
    photo.save(inputs / "xportrait_reference.png")
    ImageOps.mirror(photo).save(inputs / "xportrait_reference_2.png")
    Image.new("RGB", (256, 256), (128, 128, 128)).save(inputs / "blank.png")
    shutil.copy(driving_video_path, inputs / "xportrait_driving.mp4")
    return extra


def write_tiny_lora(path: Path) -> None:
    """A small random kohya LoRA for the tiny UNet's attention queries (seeded), standing in for the LCM-LoRA."""
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for block, width in (("input_blocks_1_1", 32), ("middle_block_1", 64), ("output_blocks_5_1", 64)):
        key = f"lora_unet_{block}_transformer_blocks_0_attn1_to_q"
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, width, generator=g) * 0.1
        tensors[f"{key}.lora_up.weight"] = torch.randn(width, 4, generator=g) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))


def _tiny_loras(folder: Path) -> None:
    """The tiny LoRA under every LoRA name the example workflows load (the LCM-LoRA's), so that they run."""
    names = {node["inputs"]["lora_name"] for path in example_workflows() for node in load_workflow(path).values()
             if "lora_name" in node["inputs"]}
    for name in names:
        write_tiny_lora(folder / name)


# Nodes only the tests install (beside the pack, in the scratch custom_nodes/): what other packs can hand our nodes
# and no core node makes. An empty batch comes e.g. from a video loader told to skip past the last frame (core
# ComfyUI's Get Video Components fails on a video without frames before our nodes see it).
TEST_NODES = '''
class TestEmptyImageBatch:
    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "empty"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def empty(self, image):
        return (image[:0],)


NODE_CLASS_MAPPINGS = {"TestEmptyImageBatch": TestEmptyImageBatch}
'''


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory, golden_state_dict_path, source_image_path, driving_video_path):
    """One ComfyUI for the whole test session (starting one takes seconds); stopped at the end."""
    comfy = comfyui_checkout()
    base = tmp_path_factory.mktemp("comfyui_base")
    weights = tmp_path_factory.mktemp("xportrait_weights")
    extra = _prepare_base(base, weights, golden_state_dict_path, source_image_path, driving_video_path)
    server = start_comfyui(comfy, base, extra)
    try:
        yield server
    finally:
        stop_comfyui(server)


def load_workflow(workflow: str | Path) -> dict:
    """An API-format workflow by path or by name (workflows/<name>_api.json)."""
    path = Path(workflow) if str(workflow).endswith(".json") else WORKFLOWS / f"{workflow}_api.json"
    return json.loads(path.read_text())


def shrink(prompt: dict, model: str = TINY_MODEL, tag: str = "") -> dict:
    """An API-format prompt shrunk to the tiny model in place: 64px, 2 steps, the first frames of the driving
    video, videos saved under output/tests/."""
    for node_id, node in prompt.items():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "XPortraitLoadModel":
            inputs["model_name"] = model
        elif kind == "XPortraitLoadReference":
            inputs["resolution"] = TINY_RESOLUTION
        elif kind == "XPortraitSampler":
            inputs["steps"] = TINY_STEPS
        elif kind == "KSampler":
            inputs["steps"] = min(int(inputs["steps"]), 3)
        elif kind == "ImageFromBatch":
            inputs["length"] = NUM_FRAMES
        elif kind in ("SaveVideo", "SaveImage"):
            inputs["filename_prefix"] = f"tests/{tag or 'prompt'}_{node_id}"
    return prompt


def tiny_prompt(workflow: str | Path, model: str = TINY_MODEL) -> dict:
    """An example workflow (name or path) shrunk to the tiny model (see `shrink`)."""
    return shrink(load_workflow(workflow), model, tag=Path(str(workflow)).stem)


def nodes_of(prompt: dict, class_type: str) -> list[dict]:
    """The nodes of a prompt of one class, in id order (to change their inputs)."""
    return [node for node in prompt.values() if node["class_type"] == class_type]


def node_id_of(prompt: dict, class_type: str) -> str:
    (node_id,) = [k for k, node in prompt.items() if node["class_type"] == class_type]
    return node_id
