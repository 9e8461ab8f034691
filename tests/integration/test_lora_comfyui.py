"""X-Portrait Load LoRA inside ComfyUI's own model management (CPU): the LoRA travels as weight patches on a
ModelPatcher clone, is merged when that model is loaded, taken off for the plain model, never merged twice.

Runs ComfyUI's modules (not a server) in COMFYUI_PATH with its Python (COMFYUI_PYTHON, else COMFYUI_PATH/venv/bin/
python, else this one); skipped, saying why, when COMFYUI_PATH is not set, like the headless tests.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pack_loader import ROOT

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set: needs a ComfyUI checkout")

SCRIPT = r'''
import os, sys, tempfile
sys.argv = ["check", "--cpu"]
comfy_path, root, golden = os.environ["CHECK_PATHS"].split(os.pathsep)
for p in (comfy_path, root, os.path.join(root, "tests")):
    sys.path.insert(0, p)
import comfy.options
comfy.options.enable_args_parsing()
import folder_paths
import comfy.model_management
from pack_loader import load_pack
from lora_files import write_diffusers_lora, write_kohya_lora
from xportrait_core.model.checkpoint import load_xportrait
from xportrait_core.model.config import XPortraitConfig

pack = load_pack()
for low_vram in (False, True):
    model = load_xportrait(golden, XPortraitConfig.tiny())
    handle = pack.nodes.loader.LoadedXPortrait(model, "tiny", "auto", low_vram=low_vram)
    assert handle.patcher is not None
    folder = tempfile.mkdtemp()
    folder_paths.add_model_folder_path("loras", folder)
    kohya = write_kohya_lora(os.path.join(folder, "k.safetensors"), model.unet, rank=4, alpha=2.0, seed=1)
    peft = write_diffusers_lora(os.path.join(folder, "p.safetensors"), model.unet, rank=2, seed=2)
    original = {k: v.clone() for k, v in model.unet.state_dict().items()}
    node = pack.nodes.lora.LoadLoRA()
    (a,) = node.load(handle, "k.safetensors", 0.5)
    (b,) = node.load(a, "p.safetensors", 1.0)  # stacked
    (z,) = node.load(handle, "k.safetensors", 0.0)
    assert a.model is model and b.model is model and a.patcher is not handle.patcher

    def check(expected, what):
        state = model.unet.state_dict()
        worst = max((state[k].float() - (original[k] + expected(k))).abs().max().item() for k in original)
        print(f"low_vram={low_vram} {what}: {worst:.2e}")
        assert worst < 1e-5, what

    a.ready(); check(lambda k: 0.5 * kohya.get(k, 0), "kohya at 0.5")
    b.ready(); check(lambda k: 0.5 * kohya.get(k, 0) + peft.get(k, 0), "kohya at 0.5 + peft at 1")
    handle.ready(); check(lambda k: 0, "the plain model")
    a.ready(); a.ready(); check(lambda k: 0.5 * kohya.get(k, 0), "kohya again, made ready twice")
    z.ready(); check(lambda k: 0, "strength 0")
    handle.ready()
print("ok")
'''


def _python(comfy: Path) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = comfy / "venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def test_lora_node_patches_through_comfyui_model_management(golden_state_dict_path, tmp_path):
    comfy = Path(COMFYUI_PATH).resolve()
    env = {**os.environ, "CHECK_PATHS": os.pathsep.join([str(comfy), str(ROOT), str(golden_state_dict_path)]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([_python(comfy), "-c", SCRIPT], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok")
    assert out.stdout.count(": 0.00e+00") >= 8, out.stdout
