"""The example workflows, UI and API format, checked against the nodes' declared inputs and outputs.

Our nodes are checked against their live INPUT_TYPES / RETURN_TYPES; ComfyUI's core nodes against a snapshot of
ComfyUI 0.3.64's /object_info (tests/fixtures/comfyui_core_nodes.json). tests/test_comfyui_headless.py runs the
API files in a real ComfyUI, whose own validation then covers the core nodes too; the UI files were checked in
ComfyUI's frontend (loadGraphData + graphToPrompt gives the API files exactly).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from pack_loader import ROOT, node_classes

WORKFLOWS = ROOT / "workflows"
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))
# Combos whose choices are the files of an install (models, uploads): any file name of the right kind is valid.
FILE_COMBOS = {
    ("XPortraitLoadModel", "model_name"): (".th", ".ckpt", ".pt", ".safetensors"),
    ("LoraLoaderModelOnly", "lora_name"): (".safetensors", ".pt", ".ckpt"),
    ("XPortraitLoadLoRA", "lora_name"): (".safetensors", ".pt", ".ckpt", ".pth", ".bin"),
    ("LoadImage", "image"): (".png", ".jpg", ".jpeg", ".webp"),
    ("LoadVideo", "file"): (".mp4", ".webm", ".mov", ".mkv"),
}


def _generator():
    spec = importlib.util.spec_from_file_location("make_workflows", WORKFLOWS / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return _generator()


@pytest.fixture(scope="module")
def specs(gen):
    return gen.load_specs()


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_are_six_workflow_pairs_covering_every_node():
    names = [p.stem for p in UI_FILES]
    assert names == ["xportrait_basic_animation", "xportrait_ksampler", "xportrait_lcm_lora",
                     "xportrait_lcm_lora_sampler", "xportrait_multi_reference_identity",
                     "xportrait_upscale_restore_paste_back"]
    used = set()
    for path in UI_FILES:
        assert (WORKFLOWS / f"{path.stem}_api.json").is_file(), f"{path.name} has no API-format twin"
        used |= {node["class_type"] for node in _load(WORKFLOWS / f"{path.stem}_api.json").values()}
    assert set(node_classes()) <= used, f"nodes in no workflow: {set(node_classes()) - used}"


def test_workflow_files_are_what_the_generator_writes(gen):
    """The files follow the nodes' current declarations: a changed input would show up here."""
    for name, (ui, api) in gen.build_all().items():
        assert _load(WORKFLOWS / f"{name}.json") == ui, f"{name}.json is stale: run python3 workflows/make_workflows.py"
        assert _load(WORKFLOWS / f"{name}_api.json") == api, f"{name}_api.json is stale"


def types_match(output_type: str, input_type: str) -> bool:
    """ComfyUI's rule (execution.validate_node_input): equal, a wildcard, or overlapping comma-separated unions."""
    if output_type == "*" or input_type == "*":
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def check_value(gen, node_type: str, name: str, entry, value) -> None:
    where = f"{node_type}.{name} = {value!r}"
    kind, options = gen.input_kind(entry), gen.options(entry)
    if (node_type, name) in FILE_COMBOS:
        assert isinstance(value, str) and value.lower().endswith(FILE_COMBOS[(node_type, name)]), where
        return
    if kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "COMBO":
        choices = entry[0] if isinstance(entry[0], list) else options.get("options", [])
        assert value in choices, f"{where} not in {choices}"
    if kind in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), f"{where} out of range"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_format_is_valid(path, gen, specs):
    prompt = _load(WORKFLOWS / f"{path.stem}_api.json")
    has_output = False
    for node_id, node in prompt.items():
        node_type = node["class_type"]
        assert node_type in specs, f"node {node_id}: unknown class_type {node_type}"
        spec = specs[node_type]
        has_output |= bool(spec.get("output_node"))
        declared = {name: (entry, optional) for name, entry, optional in gen.ordered_inputs(spec)}
        extra = set(node["inputs"]) - set(declared) - set(gen.FRONTEND_INPUTS.get(node_type, {}))
        assert not extra, f"node {node_id} ({node_type}): undeclared inputs {extra}"
        for name, (entry, optional) in declared.items():
            if name not in node["inputs"]:
                assert optional, f"node {node_id} ({node_type}): required input {name} is neither wired nor given"
                continue
            value = node["inputs"][name]
            if isinstance(value, list):
                source_id, slot = value
                assert source_id in prompt, f"node {node_id}.{name}: links to missing node {source_id}"
                source_spec = specs[prompt[source_id]["class_type"]]
                assert 0 <= slot < len(source_spec["output"])
                assert types_match(source_spec["output"][slot], gen.input_kind(entry)), (
                    f"node {node_id}.{name} ({gen.input_kind(entry)}) wired to {source_spec['output'][slot]}")
            else:
                assert gen.is_widget(entry), f"node {node_id}.{name} is a socket but was given a value"
                check_value(gen, node_type, name, entry, value)
    assert has_output, "the workflow has no output node: ComfyUI would run nothing"
    # acyclic: ComfyUI executes in dependency order
    state = {}

    def visit(node_id):
        assert state.get(node_id) != "open", f"cycle through node {node_id}"
        if state.get(node_id) == "done":
            return
        state[node_id] = "open"
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list):
                visit(value[0])
        state[node_id] = "done"

    for node_id in prompt:
        visit(node_id)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_format_is_valid_and_matches_the_api_format(path, gen, specs):
    ui = _load(path)
    prompt = _load(WORKFLOWS / f"{path.stem}_api.json")
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] == max(nodes)
    links = {link[0]: link for link in ui["links"]}
    assert len(links) == len(ui["links"]) and ui["last_link_id"] == max(links)
    for link_id, source, source_slot, target, target_slot, kind in ui["links"]:
        assert link_id in (nodes[source]["outputs"][source_slot]["links"] or [])
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert kind == nodes[source]["outputs"][source_slot]["type"]
        assert types_match(kind, nodes[target]["inputs"][target_slot]["type"])

    real = [node for node in ui["nodes"] if node["type"] not in gen.VIRTUAL_NODES]
    assert {str(node["id"]) for node in real} == set(prompt), "UI and API formats hold different nodes"
    for node in real:
        spec = specs[node["type"]]
        api_inputs = prompt[str(node["id"])]["inputs"]
        assert prompt[str(node["id"])]["class_type"] == node["type"]
        assert [o["type"] for o in node["outputs"]] == list(spec["output"])
        values = iter(node["widgets_values"])
        by_name = {slot["name"]: slot for slot in node["inputs"]}
        for name, entry, _optional in gen.ordered_inputs(spec):
            slot = by_name[name]
            link = slot["link"]
            if link is not None:
                _, source, source_slot, _, _, _ = links[link]
                assert api_inputs[name] == [str(source), source_slot], f"node {node['id']}.{name}: formats differ"
            if gen.is_widget(entry):
                for kind in gen.widget_slots(entry):
                    value = next(values)
                    if kind == "value" and link is None:
                        assert api_inputs[name] == value, f"node {node['id']}.{name}: widget value differs"
                        check_value(gen, node["type"], name, entry, value)
                    elif kind == "control_after_generate":
                        assert value in ("fixed", "increment", "decrement", "randomize")
            elif link is None:
                assert name not in api_inputs
        assert next(values, None) is None, f"node {node['id']}: more widget values than widgets"


def test_notes_name_the_packs_to_add():
    text = " ".join(node["widgets_values"][0] for path in UI_FILES for node in _load(path)["nodes"]
                    if node["type"] == "Note")
    for pack in ("VideoHelperSuite", "comfyui-reactor-node", "facerestore_cf"):
        assert pack in text


@pytest.mark.parametrize("make", ["basic_animation", "multi_reference_identity", "upscale_restore_paste_back"])
def test_layout_has_no_overlaps_and_every_title_in_view(gen, specs, make):
    graph = getattr(gen, make)()
    assert gen.check_layout(graph, specs) == []
    # The checker itself catches an overlap and a title above the canvas.
    moved = getattr(gen, make)()
    moved.nodes[1].pos = moved.nodes[0].pos
    moved.nodes[0].pos = (moved.nodes[0].pos[0], 10)
    problems = gen.check_layout(moved, specs)
    assert any("overlaps" in p for p in problems) and any("off screen" in p for p in problems)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_every_output_depends_on_the_model(path, specs):
    """A missing checkpoint must stop the whole prompt at validation (ComfyUI's dialog naming the file): ComfyUI
    runs the outputs whose inputs validate, so an output that does not need the model would run and report
    success while no video is written."""
    prompt = _load(WORKFLOWS / f"{path.stem}_api.json")
    loaders = {nid for nid, node in prompt.items() if node["class_type"] == "XPortraitLoadModel"}

    def ancestors(node_id: str, seen: set) -> set:
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and value[0] not in seen:
                seen.add(value[0])
                ancestors(value[0], seen)
        return seen

    outputs = [nid for nid, node in prompt.items() if specs[node["class_type"]].get("output_node")]
    assert outputs
    for nid in outputs:
        assert ancestors(nid, set()) & loaders, f"{prompt[nid]['_meta']['title']} does not depend on the model"
