"""The pack inside a real ComfyUI, used the way a user uses it: through ComfyUI's HTTP API and websocket.

One ComfyUI is started for the session (tests/comfyui_server.py: COMFYUI_PATH, --cpu, 127.0.0.1, a scratch base
directory) and the example API workflows are queued with tiny weights. Without COMFYUI_PATH these tests skip,
except under CI, where .ci/run always provides ComfyUI and they must run.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from comfyui_server import (
    NUM_FRAMES,
    PACK_MODULE,
    ROOT,
    TINY_RESOLUTION,
    Events,
    comfyui_tests,
    example_workflows,
    load_workflow,
    node_id_of,
    nodes_of,
    shrink,
    tiny_prompt,
)
from media import video_with_sound
from pack_loader import node_classes

pytestmark = comfyui_tests

PACK_NODES = sorted(node_classes())
_seed = iter(range(1000, 100000))


def fresh(prompt: dict) -> dict:
    """The prompt with a seed not used before, so that ComfyUI's cache cannot answer for the Sampler."""
    for node in nodes_of(prompt, "XPortraitSampler"):
        node["inputs"]["seed"] = next(_seed)
    return prompt


def basic(**sampler_inputs) -> dict:
    prompt = fresh(tiny_prompt("xportrait_basic_animation"))
    nodes_of(prompt, "XPortraitSampler")[0]["inputs"].update(sampler_inputs)
    return prompt


# ---- names tests/integration/test_comfyui_native.py imports from here (new tests: use comfyui_server's helpers)

@pytest.fixture(scope="module")
def server(comfyui):
    return comfyui


def _assert_succeeded(server, entry: dict, what: str = "") -> None:
    status = entry["status"]
    assert status["status_str"] == "success", f"{what} failed: {json.dumps(status['messages'])[:3000]}"


def _saved_frames(server, entry: dict):
    return server.saved_frames(entry)


# ---- the pack as ComfyUI sees it ------------------------------------------------------------------------------

def test_the_pack_loads_and_lists_its_models(comfyui):
    info = comfyui.object_info
    ours = {name for name, node in info.items() if node.get("python_module") == PACK_MODULE}
    assert ours == set(PACK_NODES), f"nodes registered from the pack: {sorted(ours)}\n{comfyui.log_tail()}"
    assert all(info[name]["category"] == "X-Portrait" for name in PACK_NODES)
    choices = info["XPortraitLoadModel"]["input"]["required"]["model_name"][0]
    assert choices == ["not_xportrait.safetensors", "official_format.th", "tiny_with_clip.safetensors",
                       "truncated.safetensors", "truncated.th"], "extra_model_paths + extensions"
    failed = [line for line in comfyui.log.read_text(errors="replace").splitlines()
              if "IMPORT FAILED" in line and "ComfyUI-XPortrait" in line]
    assert not failed, comfyui.log_tail()


def test_core_nodes_match_the_snapshot_the_workflow_tests_use(comfyui):
    """tests/integration/test_workflows.py validates core nodes against a snapshot: it must agree with this
    ComfyUI."""
    snapshot = json.loads((ROOT / "tests" / "fixtures" / "comfyui_core_nodes.json").read_text())["nodes"]
    used = {node["class_type"] for path in example_workflows() for node in json.loads(path.read_text()).values()}
    for name in sorted(used - set(PACK_NODES)):
        live, snap = comfyui.object_info[name], snapshot[name]
        assert live["output"] == snap["output"], name
        for group in ("required", "optional"):
            live_inputs, snap_inputs = live["input"].get(group, {}), snap["input"].get(group, {})
            assert list(live_inputs) == list(snap_inputs), f"{name} {group} inputs changed"
            for key in live_inputs:
                kind = lambda e: "COMBO" if isinstance(e[0], list) else e[0]
                assert kind(live_inputs[key]) == kind(snap_inputs[key]), f"{name}.{key} changed type"


def _bad_values(spec) -> list[tuple[object, str, str]]:
    """(value, error type, message) that ComfyUI's validation must answer for an input declared as `spec`."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list) or kind == "COMBO":
        return [("no such choice", "value_not_in_list", "Value not in list")]
    found = []
    if kind in ("INT", "FLOAT"):
        step = 1 if kind == "INT" else 0.5
        if "max" in options:
            found.append((options["max"] + step, "value_bigger_than_max", f"Value {options['max'] + step} bigger "
                                                                          f"than max of {options['max']}"))
        if "min" in options:
            found.append((options["min"] - step, "value_smaller_than_min", f"Value {options['min'] - step} "
                                                                           f"smaller than min of {options['min']}"))
    return found


def _refusal(comfyui, prompt: dict, node_id: str) -> list[dict]:
    """ComfyUI's validation errors for one node of a prompt, as (type, message, input) dicts."""
    answer = comfyui.validate(prompt)
    node = answer.get("node_errors", {}).get(node_id)
    assert node, f"ComfyUI accepted node {node_id}: {json.dumps(answer)[:2000]}"
    assert node["class_type"] == prompt[node_id]["class_type"]
    return [{"type": e["type"], "message": e["message"], "input": e["extra_info"].get("input_name"),
             "details": e.get("details", "")} for e in node["errors"]]


@pytest.mark.parametrize("node_type", PACK_NODES)
def test_comfyui_validates_each_input_the_node_declares(comfyui, node_type):
    """Each widget input's declared range or choices is enforced by ComfyUI before anything runs, naming the node
    and the input, and a missing required input is refused the same way: what the frontend outlines in red. (The
    example workflows, which set every input, pass the same validation in test_example_workflow_runs.)"""
    workflows = [path for path in example_workflows() if nodes_of(load_workflow(path), node_type)]
    assert workflows, f"{node_type} is in no example workflow (workflows/*_api.json): add one that uses it"
    declared = comfyui.object_info[node_type]["input"]
    display_name = comfyui.object_info[node_type]["display_name"]
    checked = []
    for group in ("required", "optional"):
        for name, spec in declared.get(group, {}).items():
            for value, error_type, message in _bad_values(spec):
                prompt = tiny_prompt(workflows[0])  # cached nodes: the outputs ComfyUI still runs are quick
                node_id = next(k for k, n in prompt.items() if n["class_type"] == node_type)
                prompt[node_id]["inputs"][name] = value
                errors = _refusal(comfyui, prompt, node_id)
                own = [e for e in errors if e["type"] == "custom_validation_failed" and e["input"] == name]
                if own:  # the node's VALIDATE_INPUTS takes this input (ComfyUI then leaves its range to it)
                    # ComfyUI shows "<input> - <the node's message>"; the message names the node and the value.
                    assert own[0]["details"].startswith(f"{name} - {display_name}: "), (name, value, own)
                    assert str(value) in own[0]["details"], (name, value, own)
                else:
                    assert {"type": error_type, "message": message, "input": name} in [
                        {k: e[k] for k in ("type", "message", "input")} for e in errors], (name, value, errors)
                checked.append(name)
    for name in declared["required"]:
        prompt = tiny_prompt(workflows[0])  # cached nodes: the outputs ComfyUI still runs are quick
        node_id = next(k for k, n in prompt.items() if n["class_type"] == node_type)
        del prompt[node_id]["inputs"][name]
        errors = _refusal(comfyui, prompt, node_id)
        assert {"type": "required_input_missing", "message": "Required input is missing", "input": name} in [
            {k: e[k] for k in ("type", "message", "input")} for e in errors], (name, errors)
        checked.append(name)
    assert set(declared["required"]) <= set(checked)
    comfyui.assert_serving()


# ---- the example workflows ------------------------------------------------------------------------------------

@pytest.mark.parametrize("workflow", example_workflows(), ids=lambda path: path.name.removesuffix("_api.json"))
def test_example_workflow_runs(comfyui, workflow):
    """Each workflows/*_api.json, shrunk to the tiny weights, runs to success and saves its animation: one frame
    per driving frame, at the crop size (or, pasted back, at the full photo's size)."""
    prompt = fresh(tiny_prompt(workflow))
    entry = comfyui.run_ok(prompt, workflow.name)
    frames = comfyui.saved_frames(entry)
    from PIL import Image

    photo = Image.open(comfyui.base / "input" / "xportrait_reference.png")
    size = (photo.height, photo.width) if nodes_of(prompt, "XPortraitPasteBack") else (TINY_RESOLUTION,) * 2
    assert frames.shape == (NUM_FRAMES, *size, 3)
    assert frames.std() > 1, "the animation is a flat image"
    if nodes_of(prompt, "XPortraitIdentityCheck") and nodes_of(prompt, "PreviewAny"):
        texts = [t for output in entry["outputs"].values() for t in output.get("text", [])]
        assert any(f"identity over {NUM_FRAMES} frames" in t for t in texts), texts


def test_low_vram_mode_runs_under_comfyui_model_management_and_gives_the_same_frames(comfyui):
    """vram: low hands ComfyUI's ModelPatcher only the networks kept on the GPU; the job still runs through
    load_models_gpu and gives the frames of the normal mode."""
    frames = {}
    prompt = basic()
    for vram in ("normal", "low"):
        # dtype fp32 (= auto on CPU) is a load no earlier test cached: see the report on a model reused after the
        # LoRA workflows giving other frames.
        nodes_of(prompt, "XPortraitLoadModel")[0]["inputs"].update(vram=vram, dtype="fp32")
        nodes_of(prompt, "SaveVideo")[0]["inputs"]["filename_prefix"] = f"tests/vram_{vram}"
        frames[vram] = comfyui.saved_frames(comfyui.run_ok(prompt, f"vram {vram}")).astype(int)
    assert frames["low"].shape == frames["normal"].shape == (NUM_FRAMES, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert abs(frames["low"] - frames["normal"]).max() <= 2  # the same frames, through the same video encoder


def test_the_saved_animation_carries_the_driving_videos_sound(comfyui):
    """A talking head keeps its voice: the example workflow passes the driving video's audio to Create Video,
    and the animation (one frame per driving frame) lasts as long as it."""
    import av

    duration = video_with_sound(comfyui.base / "input" / "xportrait_driving.mp4",
                                 comfyui.base / "input" / "talking.mp4", NUM_FRAMES)
    prompt = basic()
    nodes_of(prompt, "LoadVideo")[0]["inputs"]["file"] = "talking.mp4"
    entry = comfyui.run_ok(prompt)
    with av.open(str(comfyui.saved_video(entry))) as container:
        assert len(container.streams.audio) == 1, "the animation has no sound"
        sound = sum(f.samples for f in container.decode(container.streams.audio[0])) / 44100
        container.seek(0)
        frames = sum(1 for _ in container.decode(container.streams.video[0]))
    assert frames == NUM_FRAMES
    assert abs(sound - duration) < 0.1, (sound, duration)


def test_the_streaming_writer_pastes_back_with_the_driving_videos_rate_and_sound(comfyui):
    """X-Portrait Write Video takes the Sampler's LATENT and Load Video's VIDEO: the full photo's frames, one per
    driving frame, at the driving video's frame rate and with its voice, in ComfyUI's output folder."""
    import av

    duration = video_with_sound(comfyui.base / "input" / "xportrait_driving.mp4",
                                comfyui.base / "input" / "talking_streamed.mp4", NUM_FRAMES)
    prompt = basic()
    nodes_of(prompt, "LoadVideo")[0]["inputs"]["file"] = "talking_streamed.mp4"
    loader, reference, video, sampler = (node_id_of(prompt, kind) for kind in (
        "XPortraitLoadModel", "XPortraitLoadReference", "LoadVideo", "XPortraitSampler"))
    prompt["streamed"] = {"class_type": "XPortraitWriteVideo", "inputs": {
        "xportrait_model": [loader, 0], "latent": [sampler, 1], "filename_prefix": "tests/streamed", "fps": 25.0,
        "paste_back": True, "decode_chunk": 4, "reference": [reference, 0], "driving_video": [video, 0]}}
    entry = comfyui.run_ok(prompt, "Write Video")
    item = entry["outputs"]["streamed"]["images"][0]
    path = comfyui.base / "output" / item["subfolder"] / item["filename"]
    assert item["type"] == "output" and path.is_file()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert float(stream.average_rate) == pytest.approx(12000 / 1001, abs=0.01)
        frames = [f for f in container.decode(stream)]
        container.seek(0)
        sound = sum(f.samples for f in container.decode(container.streams.audio[0])) / 44100
    assert len(frames) == NUM_FRAMES and (frames[0].height, frames[0].width) == (512, 512)  # the photo's size
    assert abs(sound - duration) < 0.1, (sound, duration)


def test_a_second_sampler_can_start_from_the_first_ones_frames(comfyui):
    """Chaining: Sampler -> (frames as init_frames, 'noised init frames') -> Sampler -> Create Video runs in
    ComfyUI, e.g. to refine another animator's output of the same crop."""
    prompt = basic()
    sampler_id = node_id_of(prompt, "XPortraitSampler")
    second = json.loads(json.dumps(prompt[sampler_id]))
    second["inputs"].update(initial_latents="noised init frames", init_frames=[sampler_id, 0], seed=5)
    prompt["99"] = second
    nodes_of(prompt, "CreateVideo")[0]["inputs"]["images"] = ["99", 0]
    entry = comfyui.run_ok(prompt)
    assert comfyui.saved_frames(entry).shape == (NUM_FRAMES, TINY_RESOLUTION, TINY_RESOLUTION, 3)


# ---- what the frontend sees while it runs: progress, previews, Cancel ----------------------------------------

STEPS_WATCHED = 3


@pytest.fixture(scope="module")
def watched_run(comfyui):
    """One Sampler run of STEPS_WATCHED steps with the frontend's websocket open: (prompt, entry, events)."""
    prompt = basic(steps=STEPS_WATCHED)
    with Events(comfyui) as events:
        entry = comfyui.run_ok(prompt, "the watched run", client_id=events.client_id)
        events.wait_for(lambda kind, data: kind == "execution_success" and data["prompt_id"] == entry["prompt"][1])
    return prompt, entry, events


def test_progress_events_arrive_while_the_sampler_samples(watched_run):
    """The frontend's progress bar on the Sampler moves step by step while it samples, up to its full length,
    between the moment the Sampler starts and the moment it finishes."""
    prompt, entry, events = watched_run
    prompt_id, sampler = entry["prompt"][1], node_id_of(prompt, "XPortraitSampler")
    messages = events.of_prompt(prompt_id)
    started = next(t for t, kind, data in messages if kind == "executing" and data.get("node") == sampler)
    finished = next(t for t, kind, data in messages if kind == "executed" and data.get("node") == sampler) \
        if any(kind == "executed" and data.get("node") == sampler for _, kind, data in messages) else \
        next(t for t, kind, data in messages if kind == "executing" and t > started and data.get("node") != sampler)
    progress = [(t, data["value"], data["max"]) for t, kind, data in messages
                if kind == "progress" and data.get("node") == sampler]
    assert len(progress) >= STEPS_WATCHED, progress
    assert all(started <= t <= finished for t, _, _ in progress), "progress came outside the Sampler's run"
    values = [value for _, value, _ in progress]
    assert values == sorted(values) and values[0] < values[-1] == progress[-1][2], values
    assert len({total for _, _, total in progress}) <= 2, "the bar's length changes more than once"


def test_the_sampler_sends_previews_to_the_comfyui_frontend(watched_run):
    """Started with --preview-method latent2rgb, ComfyUI shows the Sampler's x_0 while it samples: a preview
    image reaches the frontend's websocket at every step, four frames side by side."""
    from PIL import Image

    _, _, events = watched_run
    assert len(events.previews) >= STEPS_WATCHED, f"{len(events.previews)} previews"
    width, height = Image.open(io.BytesIO(events.previews[-1])).size
    assert width == 4 * height


def test_cancel_stops_the_sampler_and_the_next_prompt_runs(comfyui):
    """ComfyUI's Cancel (POST /interrupt) during sampling stops the Sampler within a model call, as an
    interruption, not an error; the server keeps serving and the next prompt runs."""
    prompt = basic(steps=1000)  # minutes of work at this size if nothing stopped it
    with Events(comfyui) as events:
        prompt_id = comfyui.queue(prompt, client_id=events.client_id)
        sampler = node_id_of(prompt, "XPortraitSampler")
        events.wait_for(lambda kind, data: kind == "progress" and data.get("node") == sampler
                        and data.get("prompt_id") == prompt_id and data["value"] >= 2, timeout=120)
        interrupted_at = time.monotonic()
        comfyui.post("/interrupt", {})
        entry = comfyui.wait(prompt_id, timeout=60)
    assert time.monotonic() - interrupted_at < 20
    kinds = {kind: data for kind, data in entry["status"]["messages"]}
    assert "execution_interrupted" in kinds and "execution_error" not in kinds, entry["status"]
    assert kinds["execution_interrupted"]["node_type"] == "XPortraitSampler"
    comfyui.assert_serving()
    comfyui.run_ok(basic(), "the prompt after Cancel")


# ---- bad inputs: an execution_error that says what is wrong, and the server goes on ---------------------------

def test_one_driving_frame_gives_a_one_frame_animation(comfyui):
    """A driving batch of a single frame (a photo as the driving pose) is no error: one output frame per driving
    frame."""
    prompt = basic()
    nodes_of(prompt, "ImageFromBatch")[0]["inputs"]["length"] = 1
    frames = comfyui.saved_frames(comfyui.run_ok(prompt, "one driving frame"))
    assert frames.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)


def _no_face(prompt):
    nodes_of(prompt, "LoadImage")[0]["inputs"]["image"] = "blank.png"


def _no_driving_frames(prompt):
    """The driving frames through the test-only node that keeps none of them (tests/comfyui_server.py)."""
    motion = nodes_of(prompt, "XPortraitExtractMotion")[0]["inputs"]
    prompt["98"] = {"class_type": "TestEmptyImageBatch", "inputs": {"image": motion["driving_frames"]}}
    motion["driving_frames"] = ["98", 0]


def _model(name):
    def use(prompt):
        nodes_of(prompt, "XPortraitLoadModel")[0]["inputs"]["model_name"] = name
    return use


# case: (how the tiny basic prompt is spoilt, the node that fails, the start of its message)
BAD_INPUTS = {
    "portrait_without_a_face": (
        _no_face, "XPortraitLoadReference",
        "X-Portrait Load Reference: No face was found in the reference image (searched the whole 256x256 image)."),
    "empty_driving_batch": (
        _no_driving_frames, "XPortraitExtractMotion",
        "X-Portrait Extract Motion: driving_frames: the image batch is empty (0 images)"),
    "not_an_xportrait_checkpoint": (
        _model("not_xportrait.safetensors"), "XPortraitLoadModel",
        "X-Portrait Load Model: not_xportrait.safetensors is not an X-Portrait checkpoint of a known size"),
    "truncated_official_checkpoint": (
        _model("truncated.th"), "XPortraitLoadModel",
        "X-Portrait Load Model: truncated.th is incomplete or damaged (a download that stopped early?): download it "
        "again"),
    "truncated_safetensors_checkpoint": (
        _model("truncated.safetensors"), "XPortraitLoadModel",
        "X-Portrait Load Model: truncated.safetensors is not a complete safetensors file (damaged, or the download "
        "stopped early): download it again"),
    "checkpoint_without_its_text_encoder": (
        _model("official_format.th"), "XPortraitSampler",
        "this X-Portrait checkpoint has no CLIP text encoder weights"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_input_is_an_execution_error_that_names_the_problem(comfyui, case):
    """What the frontend's error dialog shows (the failing node and its message) says what is wrong; the server
    keeps serving, and the next prompt runs."""
    spoil, node_type, message = BAD_INPUTS[case]
    prompt = basic()
    spoil(prompt)
    error = comfyui.execution_error(prompt)
    assert error["node_type"] == node_type, error
    assert error["exception_message"].startswith(message), error["exception_message"]
    comfyui.assert_serving()
    comfyui.run_ok(basic(), f"the prompt after {case}")


# ---- the real frontend --------------------------------------------------------------------------------------

def _playwright_dir() -> Path | None:
    """A folder whose node_modules holds playwright-core: PLAYWRIGHT_DIR, else none."""
    folder = os.environ.get("PLAYWRIGHT_DIR")
    if folder and (Path(folder) / "node_modules" / "playwright-core").is_dir():
        return Path(folder)
    return None


def test_ui_workflows_load_in_the_frontend_and_what_it_queues_runs(comfyui):
    """In ComfyUI's own frontend (headless Chromium): each UI-format workflow loads with no missing node types,
    graphToPrompt gives exactly its API-format file, that prompt runs, and the graph saves back with the same
    inputs and links."""
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    folder = _playwright_dir()
    if shutil.which("node") is None or not Path(chromium).exists() or folder is None:
        why = ("the frontend check needs node, Chromium (CHROMIUM, default /usr/bin/chromium) and playwright-core "
               "installed under PLAYWRIGHT_DIR (npm install playwright-core there); see docs/ci.md")
        if os.environ.get("CI"):
            pytest.fail(why + " (CI is set: .ci/run installs them)")
        pytest.skip(why)
    files = sorted(p for p in (ROOT / "workflows").glob("*.json") if not p.name.endswith("_api.json"))
    assert files
    out = subprocess.run(["node", str(ROOT / "tests" / "frontend_roundtrip.js"), comfyui.url + "/",
                          *map(str, files)], capture_output=True, text=True, timeout=300, cwd=folder,
                         env={**os.environ, "NODE_PATH": str(folder / "node_modules")})
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    for path in files:
        result = results[str(path)]
        assert result["missing"] == [], f"{path.name}: node types unknown to the frontend: {result['missing']}"
        api = json.loads((ROOT / "workflows" / f"{path.stem}_api.json").read_text())
        assert result["output"] == api, f"{path.name}: the UI queues something else than {path.stem}_api.json"
        comfyui.run_ok(fresh(shrink(result["output"], tag=f"frontend_{path.stem}")), f"{path.name} as queued")
        mine = json.loads(path.read_text())

        # Inputs and links; the widget values are checked above through graphToPrompt (what gets queued). Saved
        # widget lists can differ: the frontend adds a "control after generate" value to any INT named seed
        # (X-Portrait Conditioning's, which does not declare one: [999, 4] is saved back as [999, 4, 4]).
        def shape(graph):
            return ({n["id"]: [(i["name"], i["type"], i["link"]) for i in n.get("inputs", [])]
                     for n in graph["nodes"]}, sorted(map(tuple, graph["links"])))

        assert shape(result["saved"]) == shape(mine), f"{path.name}: the frontend saves a different graph"


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
