"""Writes the example workflows, each in ComfyUI's UI format (`<name>.json`, what the frontend loads and saves) and
API format (`<name>_api.json`, what `POST /prompt` takes), from one description per graph.

    python3 workflows/make_workflows.py

Node inputs, outputs and widgets come from the X-Portrait nodes' own INPUT_TYPES and, for ComfyUI's core nodes,
from tests/fixtures/comfyui_core_nodes.json (a snapshot of ComfyUI's /object_info). The UI format follows what
ComfyUI's frontend (1.27) serializes: socket inputs first (optional ones with shape 7), then one input per widget,
`widgets_values` in widget order (a seed widget is followed by its "control after generate" value). Notes are
frontend-only nodes and do not appear in the API format. tests/test_workflows.py checks both files against the
node declarations, and tests/test_comfyui_headless.py runs the API files in a real ComfyUI.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORE_NODES = ROOT / "tests" / "fixtures" / "comfyui_core_nodes.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote"}  # drawn by the frontend, never sent to the server
# Widgets the frontend adds to a node on its own (not declared by the server) and sends with the prompt.
FRONTEND_INPUTS = {"PreviewAny": {"preview": ""}}
NOTE_COLOURS = {"color": "#432", "bgcolor": "#653"}


def load_pack_specs() -> dict:
    """Our nodes in /object_info form, from their declarations (no ComfyUI needed)."""
    name = "comfyui_xportrait"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    specs = {}
    for node_type, cls in sys.modules[name].NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        specs[node_type] = {
            "input": {group: {k: list(v) for k, v in inputs.get(group, {}).items()} for group in ("required", "optional")
                      if group in inputs},
            "input_order": {group: list(inputs[group]) for group in ("required", "optional") if group in inputs},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(cls.RETURN_NAMES),
            "display_name": sys.modules[name].NODE_DISPLAY_NAME_MAPPINGS[node_type],
        }
    return specs


def load_specs() -> dict:
    specs = json.loads(CORE_NODES.read_text())["nodes"]
    specs.update(load_pack_specs())
    return specs


def input_kind(entry) -> str:
    """The socket type of an /object_info input entry: a list of choices is a COMBO."""
    kind = entry[0]
    return "COMBO" if isinstance(kind, list) else kind


def options(entry) -> dict:
    return entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}


def is_widget(entry) -> bool:
    return input_kind(entry) in WIDGET_TYPES and not options(entry).get("forceInput", False)


def widget_slots(entry) -> list[str]:
    """Values a widget input stores in widgets_values: its own, plus the seed control or the upload button."""
    extra = options(entry)
    slots = ["value"]
    if extra.get("control_after_generate"):
        slots.append("control_after_generate")
    if extra.get("image_upload") or extra.get("video_upload"):
        slots.append("upload")
    return slots


def ordered_inputs(spec: dict) -> list[tuple[str, list, bool]]:
    """(name, entry, optional) in declaration order (/object_info's input_order): required then optional."""
    out = []
    for group in ("required", "optional"):
        declared = spec["input"].get(group, {})
        for name in spec.get("input_order", {}).get(group, list(declared)):
            out.append((name, declared[name], group == "optional"))
    return out


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict = field(default_factory=dict)
    title: str | None = None
    size: tuple[int, int] | None = None
    text: str | None = None  # Note nodes


@dataclass
class Graph:
    name: str
    nodes: list[Node] = field(default_factory=list)
    links: list[tuple[int, str, int, str]] = field(default_factory=list)  # (from id, output name, to id, input name)

    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        return node

    def link(self, source: Node, output: str, target: Node, input_name: str) -> None:
        self.links.append((source.id, output, target.id, input_name))


def _output_index(spec: dict, node_type: str, output: str) -> int:
    names = spec.get("output_name") or spec["output"]
    if output not in names:
        raise KeyError(f"{node_type} has no output {output!r} (outputs: {names})")
    return list(names).index(output)


def _widget_value(node: Node, name: str, entry) -> object:
    if name in node.widgets:
        return node.widgets[name]
    extra = options(entry)
    if "default" in extra:
        return extra["default"]
    if isinstance(entry[0], list) and entry[0]:
        return entry[0][0]
    if extra.get("options"):
        return extra["options"][0]
    raise KeyError(f"{node.type}.{name}: no value given and no default")


def to_ui(graph: Graph, specs: dict) -> dict:
    by_id = {node.id: node for node in graph.nodes}
    links = []
    incoming: dict[tuple[int, str], int] = {}
    outgoing: dict[tuple[int, int], list[int]] = {}
    for link_id, (src, output, dst, input_name) in enumerate(graph.links, start=1):
        src_spec = specs[by_id[src].type]
        slot = _output_index(src_spec, by_id[src].type, output)
        incoming[(dst, input_name)] = link_id
        outgoing.setdefault((src, slot), []).append(link_id)
        links.append([link_id, src, slot, dst, None, src_spec["output"][slot]])

    nodes = []
    for order, node in enumerate(graph.nodes):
        if node.type in VIRTUAL_NODES:
            nodes.append({"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size or (400, 200)),
                          "flags": {}, "order": order, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                          "widgets_values": [node.text or ""], **({"title": node.title} if node.title else {}),
                          **NOTE_COLOURS})
            continue
        spec = specs[node.type]
        sockets, widgets, values = [], [], []
        for name, entry, optional in ordered_inputs(spec):
            slot = {"localized_name": name, "name": name, "type": input_kind(entry)}
            if is_widget(entry):
                slot["widget"] = {"name": name}
                slot["link"] = incoming.get((node.id, name))
                widgets.append(slot)
                for kind in widget_slots(entry):
                    if kind == "value":
                        values.append(_widget_value(node, name, entry))
                    elif kind == "control_after_generate":
                        values.append(node.widgets.get(f"{name}:control", "fixed"))
                    else:
                        widgets.append({"localized_name": "choose file to upload", "name": "upload",
                                        "type": "IMAGEUPLOAD", "widget": {"name": "upload"}, "link": None})
                        values.append("image")
            else:
                if optional:
                    slot["shape"] = 7
                slot["link"] = incoming.get((node.id, name))
                sockets.append(slot)
        inputs = sockets + widgets
        for position, slot in enumerate(inputs):
            if slot["link"] is not None:
                links[slot["link"] - 1][4] = position
        names = spec.get("output_name") or spec["output"]
        outputs = [{"localized_name": name, "name": name, "type": kind,
                    "links": outgoing.get((node.id, index)) or None,
                    **({"slot_index": index} if outgoing.get((node.id, index)) else {})}
                   for index, (name, kind) in enumerate(zip(names, spec["output"]))]
        size = [(node.size or (320, 180))[0], node_height(node, specs)]
        entry = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": size,
                 "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                 "properties": {"Node name for S&R": node.type}}
        entry["widgets_values"] = values
        if node.title:
            entry["title"] = node.title
        nodes.append(entry)
    return {
        "id": _stable_id(graph.name),
        "revision": 0,
        "last_node_id": max(node.id for node in graph.nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}},  # opens at the top left, every title in view
        "version": 0.4,
    }


def _stable_id(name: str) -> str:
    import hashlib

    digest = hashlib.sha256(name.encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-4{digest[13:16]}-8{digest[17:20]}-{digest[20:32]}"


def to_api(graph: Graph, specs: dict) -> dict:
    by_id = {node.id: node for node in graph.nodes}
    incoming = {}
    for src, output, dst, input_name in graph.links:
        incoming[(dst, input_name)] = [str(src), _output_index(specs[by_id[src].type], by_id[src].type, output)]
    prompt = {}
    for node in graph.nodes:
        if node.type in VIRTUAL_NODES:
            continue
        spec = specs[node.type]
        inputs = {}
        for name, entry, _optional in ordered_inputs(spec):
            if (node.id, name) in incoming:
                inputs[name] = incoming[(node.id, name)]
            elif is_widget(entry):
                inputs[name] = _widget_value(node, name, entry)
        inputs.update(FRONTEND_INPUTS.get(node.type, {}))
        title = node.title or spec.get("display_name") or node.type
        prompt[str(node.id)] = {"inputs": inputs, "class_type": node.type, "_meta": {"title": title}}
    return prompt


# ---- the graphs ----------------------------------------------------------------------------------------------------

MODEL_FILE = "model_state-415001.th"
REFERENCE_FILE = "xportrait_reference.png"
SECOND_REFERENCE_FILE = "xportrait_reference_2.png"
DRIVING_FILE = "xportrait_driving.mp4"

VIDEO_NOTE = ("Load Video + Get Video Components and Create Video + Save Video are ComfyUI core nodes. For frame "
              "caps, frame skipping and more output formats, install ComfyUI-VideoHelperSuite and use its "
              "'Load Video (Upload)' (IMAGE output -> driving_frames) and 'Video Combine' (frames -> images, "
              "frame_rate from the source video) instead.")


# ---- layout ----------------------------------------------------------------------------------------------------
# Columns 360 px apart for nodes 320-330 wide; the first row starts low enough that every title bar (drawn above
# the node's position) is on screen when the workflow opens. `check_layout` (tested) proves nothing overlaps.

TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar this far above its position
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24
TOP = 60
COLUMNS = tuple(40 + 360 * i for i in range(8))
# Room the frontend adds below a node while it runs: the Sampler's live preview of the frames being denoised.
RESERVED_BELOW = {"XPortraitSampler": 380}


def node_height(node: Node, specs: dict) -> int:
    """The height the frontend gives the node at least: its rows of sockets, then its widgets (an estimate that
    errs on the tall side), or the size given when larger."""
    given = (node.size or (320, 180))[1]
    if node.type in VIRTUAL_NODES:
        return given
    spec = specs[node.type]
    entries = ordered_inputs(spec)
    sockets = sum(1 for _name, entry, _opt in entries if not is_widget(entry))
    widgets = sum(len(widget_slots(entry)) for _name, entry, _opt in entries if is_widget(entry))
    rows = max(sockets, len(spec["output"]))
    return max(given, rows * SLOT_HEIGHT + widgets * WIDGET_HEIGHT + 16)


def node_box(node: Node, specs: dict) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 of what the node covers on the canvas: title bar, body and the room it grows into."""
    width = (node.size or (320, 180))[0]
    x, y = node.pos
    return (x, y - TITLE_HEIGHT, x + width, y + node_height(node, specs) + RESERVED_BELOW.get(node.type, 0))


def check_layout(graph: Graph, specs: dict, gap: int = 10) -> list[str]:
    """Problems with a graph's layout: titles above the top of the canvas, nodes that overlap (with `gap`)."""
    problems = []
    boxes = [(node, node_box(node, specs)) for node in graph.nodes]
    for node, (x0, y0, _x1, _y1) in boxes:
        if y0 < 0 or x0 < 0:
            problems.append(f"{graph.name}: node {node.id} ({node.type}) starts off screen at {node.pos}")
    for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(boxes):
        for b, (bx0, by0, bx1, by1) in boxes[i + 1:]:
            if ax0 < bx1 + gap and bx0 < ax1 + gap and ay0 < by1 + gap and by0 < ay1 + gap:
                problems.append(f"{graph.name}: node {a.id} ({a.type}) overlaps node {b.id} ({b.type})")
    return problems


def _model_loader(graph: Graph) -> Node:
    """Node 1 of every example: X-Portrait Load Model with its defaults, top left."""
    return graph.add(Node(1, "XPortraitLoadModel", (COLUMNS[0], TOP), {"model_name": MODEL_FILE, "dtype": "auto",
                                                                       "attention": "auto", "vram": "normal",
                                                                       "compile": False},
                          size=(320, 170)))


def _driving(graph: Graph, first_id: int, y: int):
    video = graph.add(Node(first_id, "LoadVideo", (COLUMNS[0], y), {"file": DRIVING_FILE}, size=(320, 420)))
    parts = graph.add(Node(first_id + 1, "GetVideoComponents", (COLUMNS[1], y), size=(320, 90)))
    frames = graph.add(Node(first_id + 2, "ImageFromBatch", (COLUMNS[1], y + 140), {"batch_index": 0, "length": 4096},
                            title="Driving frames (first frame, how many)", size=(320, 110)))
    graph.link(video, "VIDEO", parts, "video")
    graph.link(parts, "images", frames, "image")
    return parts, frames


def _save(graph: Graph, first_id: int, column: int, frames_from: tuple[Node, str], fps_from: Node, prefix: str):
    """Create Video + Save Video at the driving video's frame rate, with its sound (none if it has none): the
    animation has one frame per driving frame, so a talking head stays in sync with its voice."""
    create = graph.add(Node(first_id, "CreateVideo", (COLUMNS[column], TOP), {"fps": 24.0}, size=(320, 100)))
    save = graph.add(Node(first_id + 1, "SaveVideo", (COLUMNS[column], TOP + 180),
                          {"filename_prefix": prefix, "format": "auto", "codec": "auto"}, size=(320, 460)))
    graph.link(frames_from[0], frames_from[1], create, "images")
    graph.link(fps_from, "fps", create, "fps")
    graph.link(fps_from, "audio", create, "audio")
    graph.link(create, "VIDEO", save, "video")


REFERENCE_WIDGETS = {"crop_margin": 0.5, "resolution": 512, "mode": "crop", "face_index": 0,
                     "face_order": "largest first"}
MOTION_WIDGETS = {"best_frame": -1, "track_missed_faces": True, "face_index": 0, "face_order": "largest first"}
SAMPLER_WIDGETS = {"seed": 999, "steps": 30, "guidance": 5.0, "window_overlap": 4,
                   "initial_latents": "noised reference"}
PREVIEW_NOTE = ("Every output of these examples comes after the Sampler, so a missing model stops the run before "
                "anything is computed, with ComfyUI's message naming the file. To check the framing or the motion "
                "before sampling, connect a Preview Image to Load Reference's 'faces' or 'crops' output or to "
                "Extract Motion's 'global_hints'. Load Reference and Extract Motion show what they found (faces, "
                "frames without a face) under the node.")


def basic_animation() -> Graph:
    g = Graph("xportrait_basic_animation")
    model = _model_loader(g)
    photo = g.add(Node(2, "LoadImage", (COLUMNS[0], 320), {"image": REFERENCE_FILE}, size=(320, 360)))
    reference = g.add(Node(3, "XPortraitLoadReference", (COLUMNS[1], 300), REFERENCE_WIDGETS, size=(320, 200)))
    parts, driving = _driving(g, 5, 720)
    motion = g.add(Node(8, "XPortraitExtractMotion", (COLUMNS[2], 560), MOTION_WIDGETS, size=(330, 200)))
    sampler = g.add(Node(10, "XPortraitSampler", (COLUMNS[3], TOP), SAMPLER_WIDGETS, size=(320, 290)))
    g.link(model, "xportrait_model", sampler, "xportrait_model")
    g.link(photo, "IMAGE", reference, "image")
    g.link(reference, "reference", motion, "reference")
    g.link(driving, "IMAGE", motion, "driving_frames")
    g.link(reference, "reference", sampler, "reference")
    g.link(motion, "motion", sampler, "motion")
    _save(g, 11, 4, (sampler, "frames"), parts, "xportrait/animation")
    g.add(Node(13, "Note", (COLUMNS[2], TOP), size=(330, 450), title="X-Portrait: basic animation", text=(
        "Animate one portrait with the motion of a driving video.\n\n"
        f"1. Put {MODEL_FILE} (or its .safetensors conversion) in ComfyUI/models/xportrait and pick it in "
        "X-Portrait Load Model.\n"
        "2. Load the portrait (any photo with a clear face; face_index picks one of several people) and the "
        "driving video (a talking/moving face).\n"
        "3. Queue. The Sampler's defaults are the official demo's (seed 999, 30 steps, guidance 5, overlap 4).\n\n"
        "Driving frames: the 'first frame, how many' node trims the video (length 4096 = all frames); try 16 "
        "frames first. The saved video carries the driving video's sound, whole: it is in sync while the first "
        "frame is 0.\nbest_frame -1 picks the driving frame whose pose matches the portrait; set a frame "
        "number if the alignment looks off, -2 to skip alignment.\n"
        "If your checkpoint has no CLIP text encoder, connect CLIP Text Encode (SD1.5 CLIP, empty text) to the "
        "Sampler's positive input.\n\n" + PREVIEW_NOTE + "\n\n" + VIDEO_NOTE)))
    return g


def multi_reference_identity() -> Graph:
    g = Graph("xportrait_multi_reference_identity")
    model = _model_loader(g)
    first = g.add(Node(2, "LoadImage", (COLUMNS[0], 320), {"image": REFERENCE_FILE}, size=(320, 360),
                       title="Reference 1 (animated)"))
    second = g.add(Node(3, "LoadImage", (COLUMNS[0], 720), {"image": SECOND_REFERENCE_FILE}, size=(320, 360),
                        title="Reference 2 (extra appearance)"))
    batch = g.add(Node(4, "ImageBatch", (COLUMNS[1], 300), size=(320, 70)))
    reference = g.add(Node(5, "XPortraitLoadReference", (COLUMNS[1], 430), REFERENCE_WIDGETS, size=(320, 200)))
    parts, driving = _driving(g, 7, 1140)
    motion = g.add(Node(10, "XPortraitExtractMotion", (COLUMNS[2], 360), MOTION_WIDGETS, size=(330, 200)))
    control = g.add(Node(11, "XPortraitHierarchicalMotionAttention", (COLUMNS[2], TOP),
                         {"global_strength": 1.0, "local_strength": 1.0, "eyes": True, "mouth": True},
                         size=(330, 200)))
    sampler = g.add(Node(12, "XPortraitSampler", (COLUMNS[3], TOP), SAMPLER_WIDGETS, size=(320, 290)))
    identity = g.add(Node(13, "XPortraitIdentityCheck", (COLUMNS[3], 800), {"threshold": 0.6}, size=(320, 130)))
    report = g.add(Node(14, "PreviewAny", (COLUMNS[5], TOP), size=(420, 220), title="Identity report"))
    plot = g.add(Node(15, "PreviewImage", (COLUMNS[5], 340), size=(420, 300), title="Identity per frame"))
    g.link(first, "IMAGE", batch, "image1")
    g.link(second, "IMAGE", batch, "image2")
    g.link(batch, "IMAGE", reference, "image")
    g.link(reference, "reference", motion, "reference")
    g.link(driving, "IMAGE", motion, "driving_frames")
    g.link(model, "xportrait_model", control, "xportrait_model")
    g.link(motion, "motion", control, "motion")
    g.link(model, "xportrait_model", sampler, "xportrait_model")
    g.link(reference, "reference", sampler, "reference")
    g.link(control, "motion", sampler, "motion")
    g.link(reference, "reference", identity, "reference")
    g.link(sampler, "frames", identity, "frames")
    g.link(driving, "IMAGE", identity, "driving_frames")
    g.link(identity, "report", report, "source")
    g.link(identity, "plot", plot, "images")
    _save(g, 16, 4, (sampler, "frames"), parts, "xportrait/multi_reference")
    g.add(Node(18, "Note", (COLUMNS[5], 700), size=(420, 420), title="X-Portrait: several references + identity check",
               text=(
                   "Several photos of the SAME person go in as one batch (Batch Images resizes the second to the "
                   "first's size; chain more Batch Images for more). The first is animated; the others add "
                   "appearance the first does not show (the other side of the face, teeth, hair). Their attention "
                   "banks are appended in order, as the official more_source_image option does.\n\n"
                   "Hierarchical Motion Attention sets the global (head pose) and local (eyes, mouth) ControlNet "
                   "strengths; 0 turns one off, the switches or a mask limit where the local one looks.\n\n"
                   "Identity Check compares every frame's face descriptor with the reference (dlib; under 0.6 is "
                   "usually the same person) and with its driving frame (leakage of the driver's identity); frames "
                   "without a face are named and left out of the mean.\n\n" + PREVIEW_NOTE)))
    return g


def upscale_restore_paste_back() -> Graph:
    g = Graph("xportrait_upscale_restore_paste_back")
    model = _model_loader(g)
    photo = g.add(Node(2, "LoadImage", (COLUMNS[0], 320), {"image": REFERENCE_FILE}, size=(320, 360),
                       title="Full photo"))
    reference = g.add(Node(3, "XPortraitLoadReference", (COLUMNS[1], 300), REFERENCE_WIDGETS, size=(320, 200)))
    parts, driving = _driving(g, 4, 720)
    motion = g.add(Node(7, "XPortraitExtractMotion", (COLUMNS[2], 620), MOTION_WIDGETS, size=(330, 200)))
    sampler = g.add(Node(8, "XPortraitSampler", (COLUMNS[3], TOP), SAMPLER_WIDGETS, size=(320, 290)))
    upscale = g.add(Node(9, "ImageScaleBy", (COLUMNS[3], 800), {"upscale_method": "lanczos", "scale_by": 2.0},
                         title="Upscale (swap for a model upscaler / face restorer)", size=(320, 110)))
    identity = g.add(Node(10, "XPortraitIdentityCheck", (COLUMNS[4], TOP), {"threshold": 0.6}, size=(320, 130)))
    report = g.add(Node(11, "PreviewAny", (COLUMNS[4], 280), size=(320, 220), title="Identity after upscaling"))
    paste = g.add(Node(12, "XPortraitPasteBack", (COLUMNS[5], TOP), {"feather": -1}, size=(320, 110)))
    mask = g.add(Node(13, "MaskPreview", (COLUMNS[5], 260), size=(320, 300), title="Paste-back blend"))
    g.link(photo, "IMAGE", reference, "image")
    g.link(reference, "reference", motion, "reference")
    g.link(driving, "IMAGE", motion, "driving_frames")
    g.link(model, "xportrait_model", sampler, "xportrait_model")
    g.link(reference, "reference", sampler, "reference")
    g.link(motion, "motion", sampler, "motion")
    g.link(sampler, "frames", upscale, "image")
    g.link(reference, "reference", identity, "reference")
    g.link(upscale, "IMAGE", identity, "frames")
    g.link(driving, "IMAGE", identity, "driving_frames")
    g.link(identity, "report", report, "source")
    g.link(upscale, "IMAGE", paste, "frames")
    g.link(reference, "reference", paste, "reference")
    g.link(paste, "mask", mask, "mask")
    _save(g, 14, 6, (paste, "frames"), parts, "xportrait/full_resolution")
    streamed = g.add(Node(17, "XPortraitWriteVideo", (COLUMNS[7], TOP), {
        "filename_prefix": "xportrait/streamed", "fps": 25.0, "paste_back": True, "decode_chunk": 4},
        title="Long videos: Write Video (streaming)", size=(340, 260)))
    video = next(node for node in g.nodes if node.type == "LoadVideo")
    g.link(model, "xportrait_model", streamed, "xportrait_model")
    g.link(sampler, "latent", streamed, "latent")
    g.link(reference, "reference", streamed, "reference")
    g.link(video, "VIDEO", streamed, "driving_video")
    g.add(Node(16, "Note", (COLUMNS[2], TOP), size=(330, 500), title="Upscale, restore, paste back", text=(
        "The Sampler animates a square crop of the photo at 512px. This graph sharpens the crop and pastes it "
        "back into the full-resolution photo.\n\n"
        "Upscale: 'Upscale Image By' (core, no model) stands in. For a learned upscaler use the core "
        "'Load Upscale Model' + 'Upscale Image (using Model)' with e.g. 4x-UltraSharp or RealESRGAN_x2 in "
        "ComfyUI/models/upscale_models.\n\n"
        "Face restore: add a face-restoration pack between the upscaler and Identity Check / Paste Back, e.g. "
        "comfyui-reactor-node ('Restore Face': GFPGAN / CodeFormer) or facerestore_cf "
        "('FaceRestoreCFWithModel').\n\n"
        "Identity Check works on any frames: keep it after the restorer to see whether restoration kept the "
        "identity.\n\nPaste Back takes frames of any size (resized to the crop) and blends them in with a "
        "feathered edge; outside the crop the photo is unchanged.\n\n"
        "Long videos: the Sampler's frames output holds every frame in memory, and Paste Back makes each as large "
        "as the photo. 'Write Video (streaming)' takes the Sampler's latent output instead and decodes, pastes "
        "back and writes the video a few frames at a time, with the driving video's frame rate and sound (no "
        "upscaler or restorer in between). Remove the upscale branch when you use only it.\n\n" + VIDEO_NOTE)))
    return g


LCM_LORA_FILE = "lcm-lora-sdv1-5.safetensors"


def _native_graph(g: Graph, sampler_widgets: dict, lora: bool) -> None:
    """X-Portrait under ComfyUI's KSampler: the loader's MODEL / CLIP / VAE, X-Portrait Conditioning, KSampler (through
    LoraLoaderModelOnly when `lora`), VAE Decode, video."""
    model = _model_loader(g)
    photo = g.add(Node(2, "LoadImage", (COLUMNS[0], 320), {"image": REFERENCE_FILE}, size=(320, 360)))
    reference = g.add(Node(3, "XPortraitLoadReference", (COLUMNS[1], 320), REFERENCE_WIDGETS, size=(320, 200)))
    parts, driving = _driving(g, 4, 720)
    motion = g.add(Node(7, "XPortraitExtractMotion", (COLUMNS[2], 560), MOTION_WIDGETS, size=(330, 200)))
    positive = g.add(Node(8, "CLIPTextEncode", (COLUMNS[2], TOP), {"text": ""}, size=(330, 100),
                          title="Prompt (official: empty)"))
    negative = g.add(Node(9, "CLIPTextEncode", (COLUMNS[2], TOP + 170), {"text": ""}, size=(330, 100),
                          title="Negative prompt (official: empty)"))
    conditioning = g.add(Node(10, "XPortraitConditioning", (COLUMNS[3], TOP), {"seed": 999, "window_overlap": 4},
                              size=(330, 200)))
    sampler = g.add(Node(11, "KSampler", (COLUMNS[4], TOP), sampler_widgets, size=(320, 280)))
    decode = g.add(Node(12, "VAEDecode", (COLUMNS[4], TOP + 340), size=(320, 60)))
    g.link(photo, "IMAGE", reference, "image")
    g.link(reference, "reference", motion, "reference")
    g.link(driving, "IMAGE", motion, "driving_frames")
    g.link(model, "clip", positive, "clip")
    g.link(model, "clip", negative, "clip")
    g.link(model, "xportrait_model", conditioning, "xportrait_model")
    g.link(positive, "CONDITIONING", conditioning, "positive")
    g.link(negative, "CONDITIONING", conditioning, "negative")
    g.link(reference, "reference", conditioning, "reference")
    g.link(motion, "motion", conditioning, "motion")
    if lora:
        loader = g.add(Node(15, "LoraLoaderModelOnly", (COLUMNS[3], TOP + 280), {"lora_name": LCM_LORA_FILE,
                                                                                 "strength_model": 1.0},
                            title="LCM-LoRA (SD1.5)", size=(330, 110)))
        g.link(model, "model", loader, "model")
        g.link(loader, "MODEL", sampler, "model")
    else:
        g.link(model, "model", sampler, "model")
    g.link(conditioning, "positive", sampler, "positive")
    g.link(conditioning, "negative", sampler, "negative")
    g.link(conditioning, "latent", sampler, "latent_image")
    g.link(sampler, "LATENT", decode, "samples")
    g.link(model, "vae", decode, "vae")
    _save(g, 13, 5, (decode, "IMAGE"), parts, "xportrait/" + g.name.removeprefix("xportrait_"))


NATIVE_NOTE = ("X-Portrait Conditioning gives the positive the reference and the motion (the negative neither, as "
               "the official guidance) and the start latent: the reference once per driving frame, which the "
               "sampler noises (use denoise 1.0). The latent batch is the frame axis; 16-frame windows are cut "
               "inside the model, their offsets drawn from the sampler's seed. Any ComfyUI sampler and scheduler "
               "works; core context-window nodes, model patches and LoRA loaders apply to the MODEL. "
               "X-Portrait Load Model's CLIP encodes the prompts (the official ones are empty); its VAE decodes.")


def ksampler_animation() -> Graph:
    g = Graph("xportrait_ksampler")
    _native_graph(g, {"seed": 999, "steps": 30, "cfg": 5.0, "sampler_name": "ddim", "scheduler": "ddim_uniform",
                      "denoise": 1.0}, lora=False)
    g.add(Node(16, "Note", (COLUMNS[3], 560), size=(330, 520), title="X-Portrait under KSampler", text=(
        "The basic animation, sampled by ComfyUI's KSampler.\n\n"
        f"1. Put {MODEL_FILE} (or its .safetensors conversion) in ComfyUI/models/xportrait.\n"
        "2. Load the portrait and the driving video; queue.\n\n"
        "ddim + ddim_uniform at 30 steps, cfg 5 is the official schedule (31 timesteps, guidance 5): the frames "
        "match the X-Portrait Sampler's but for its last step (KSampler ends at the x_0 prediction).\n\n"
        + NATIVE_NOTE + "\n\n" + VIDEO_NOTE)))
    return g


def lcm_lora_animation() -> Graph:
    g = Graph("xportrait_lcm_lora")
    _native_graph(g, {"seed": 999, "steps": 6, "cfg": 1.0, "sampler_name": "lcm", "scheduler": "sgm_uniform",
                      "denoise": 1.0}, lora=True)
    g.add(Node(16, "Note", (COLUMNS[3], 560), size=(330, 560), title="X-Portrait with the LCM-LoRA: 6 steps",
               text=(
        "Few-step X-Portrait: an SD1.5 LCM-LoRA on the X-Portrait UNet (the X-Portrait authors report that the "
        "model works with it), sampled by KSampler's lcm sampler at 6 steps and cfg 1 (one branch: no negative "
        "pass; the negative still has to come from X-Portrait Conditioning).\n\n"
        f"The LoRA: latent-consistency/lcm-lora-sdv1-5 (its pytorch_lora_weights.safetensors), saved as "
        f"ComfyUI/models/loras/{LCM_LORA_FILE}, picked in the LoRA loader. It patches the denoising UNet only; "
        "the reference net and the ControlNets keep their weights.\n\n"
        "4 to 8 steps, cfg 1 to 2, scheduler sgm_uniform (or simple). More steps or a higher cfg trade speed for "
        "detail.\n\n" + NATIVE_NOTE)))
    return g


def lcm_lora_sampler_animation() -> Graph:
    """The basic animation in 6 steps: the LCM-LoRA on the UNet (X-Portrait Load LoRA), the Sampler's lcm."""
    g = Graph("xportrait_lcm_lora_sampler")
    model = _model_loader(g)
    lora = g.add(Node(2, "XPortraitLoadLoRA", (COLUMNS[1], TOP), {"lora_name": LCM_LORA_FILE, "strength": 1.0},
                      title="LCM-LoRA (SD1.5)", size=(320, 110)))
    photo = g.add(Node(3, "LoadImage", (COLUMNS[0], 320), {"image": REFERENCE_FILE}, size=(320, 360)))
    reference = g.add(Node(4, "XPortraitLoadReference", (COLUMNS[1], 300), REFERENCE_WIDGETS, size=(320, 200)))
    parts, driving = _driving(g, 5, 720)
    motion = g.add(Node(8, "XPortraitExtractMotion", (COLUMNS[2], 560), MOTION_WIDGETS, size=(330, 200)))
    sampler = g.add(Node(9, "XPortraitSampler", (COLUMNS[3], TOP),
                         {**SAMPLER_WIDGETS, "steps": 6, "guidance": 1.5, "sampler": "lcm"}, size=(320, 310)))
    g.link(model, "xportrait_model", lora, "xportrait_model")
    g.link(lora, "xportrait_model", sampler, "xportrait_model")
    g.link(photo, "IMAGE", reference, "image")
    g.link(reference, "reference", motion, "reference")
    g.link(driving, "IMAGE", motion, "driving_frames")
    g.link(reference, "reference", sampler, "reference")
    g.link(motion, "motion", sampler, "motion")
    _save(g, 10, 4, (sampler, "frames"), parts, "xportrait/lcm_animation")
    g.add(Node(12, "Note", (COLUMNS[2], TOP), size=(330, 450), title="X-Portrait with the LCM-LoRA: 6 steps", text=(
        "Few-step X-Portrait without KSampler: the SD1.5 LCM-LoRA merged into the X-Portrait UNet (the "
        "X-Portrait authors report that the model works with it) and the Sampler's 'lcm' sampler.\n\n"
        "The LoRA: latent-consistency/lcm-lora-sdv1-5 (its pytorch_lora_weights.safetensors), saved as "
        f"ComfyUI/models/loras/{LCM_LORA_FILE} and picked in X-Portrait Load LoRA. It changes the denoising UNet "
        "only; the reference net and the ControlNets keep their weights, and the model from X-Portrait Load "
        "Model stays as it was for any other Sampler.\n\n"
        "4 to 8 steps, guidance 1 to 2 (1 skips the unconditional branch). Set the Sampler back to ddim, 30 steps "
        "and guidance 5 (and bypass the LoRA) for the official schedule.\n\n" + PREVIEW_NOTE + "\n\n"
        + VIDEO_NOTE)))
    return g


GRAPHS = (basic_animation, multi_reference_identity, upscale_restore_paste_back, ksampler_animation,
          lcm_lora_animation, lcm_lora_sampler_animation)


def build_all() -> dict[str, tuple[dict, dict]]:
    specs = load_specs()
    graphs = [make() for make in GRAPHS]
    problems = [problem for graph in graphs for problem in check_layout(graph, specs)]
    if problems:
        raise ValueError("layout: " + "; ".join(problems))
    return {graph.name: (to_ui(graph, specs), to_api(graph, specs)) for graph in graphs}


def main() -> None:
    for name, (ui, api) in build_all().items():
        (HERE / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
        (HERE / f"{name}_api.json").write_text(json.dumps(api, indent=2) + "\n")
        print(f"wrote workflows/{name}.json and workflows/{name}_api.json")


if __name__ == "__main__":
    main()
