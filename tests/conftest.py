"""Shared test fixtures: where the golden fixtures and sample assets live, and how their absence is treated.

The golden files and sample assets are not part of the repository (they sit in ../shared beside the checkout).
Locally a missing file skips the test that needs it; under CI (`CI` set) it fails, so a broken CI setup can never
turn the equivalence proofs into silent skips.
"""
from __future__ import annotations

import os
from pathlib import Path

# One CPU thread for torch (here and in the subprocesses the tests start) unless OMP_NUM_THREADS says otherwise.
# The tiny models make thousands of small ops, each an OpenMP region whose threads spin-wait at the barrier: on 2
# cores shared with anything else, 2 threads made the suite up to 13x slower (667 s vs 52 s with two busy
# processes beside it), while on 2 idle cores 1 thread costs only ~8% (52 s vs 48 s). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("XPORTRAIT_GOLDEN", ROOT.parent / "shared" / "golden"))
ASSETS_DIR = Path(os.environ.get("XPORTRAIT_ASSETS", ROOT.parent / "shared" / "assets"))


def _require(path: Path, what: str) -> Path:
    if path.exists():
        return path
    message = f"{what} not found at {path}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set: shared fixtures must be present)")
    pytest.skip(message)


def golden_path(name: str) -> Path:
    return _require(GOLDEN_DIR / name, "golden fixture")


def asset_path(name: str) -> Path:
    return _require(ASSETS_DIR / name, "sample asset")


@pytest.fixture(scope="session")
def golden_cases():
    from safetensors.torch import load_file

    return load_file(str(golden_path("tiny_cases.safetensors")))


@pytest.fixture(scope="session")
def golden_state_dict_path() -> Path:
    return golden_path("tiny_official_state_dict.safetensors")


@pytest.fixture(scope="session")
def tiny_model(golden_state_dict_path):
    """The tiny X-Portrait built from `tiny()` and loaded from the official-format golden weights (float32, CPU)."""
    import torch

    from xportrait_core.model.checkpoint import load_xportrait
    from xportrait_core.model.config import XPortraitConfig

    model = load_xportrait(golden_state_dict_path, XPortraitConfig.tiny(), dtype=torch.float32, device="cpu")
    model.eval()
    return model


@pytest.fixture(scope="session")
def source_image_path() -> Path:
    return asset_path("source_image.png")


@pytest.fixture(scope="session")
def driving_video_path() -> Path:
    return asset_path("driving_video.mp4")


@pytest.fixture(scope="session")
def portrait(source_image_path):
    """The sample portrait as uint8 RGB (H, W, 3), decoded once per session."""
    import numpy as np
    from PIL import Image

    return np.array(Image.open(source_image_path).convert("RGB"))


@pytest.fixture(scope="session")
def driving_frames(driving_video_path):
    """Every frame of the sample driving video as uint8 (N, H, W, 3), decoded once per session."""
    from xportrait_core.media.video_io import read_video

    return read_video(driving_video_path)[0]


# ---- a real ComfyUI (tests/comfyui_server.py) --------------------------------------------------------------------
from comfyui_server import comfyui  # noqa: E402,F401  (the session fixture, for every test module)


def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui: starts a real ComfyUI (COMFYUI_PATH); see tests/comfyui_server.py")


def pytest_collection_modifyitems(items):
    # Every test module named test_comfyui_* starts a real ComfyUI, with this fixture or its own.
    for item in items:
        if item.path.name.startswith("test_comfyui"):
            item.add_marker(pytest.mark.comfyui)


_PARTS: dict[str, dict[str, float]] = {}


def pytest_runtest_logreport(report):
    part = _PARTS.setdefault("ComfyUI tests" if "comfyui" in report.keywords else "pack tests",
                             dict.fromkeys(("seconds", "passed", "failed", "error", "skipped"), 0))
    part["seconds"] += report.duration
    if report.when == "call" and report.passed:
        part["passed"] += 1
    elif report.failed:
        part["failed" if report.when == "call" else "error"] += 1
    elif report.skipped:
        part["skipped"] += 1


def pytest_terminal_summary(terminalreporter):
    """One line per part of the suite with its time and counts, so that the CI log shows what ran where."""
    for name, part in sorted(_PARTS.items()):
        counts = ", ".join(f"{int(part[k])} {k}" for k in ("passed", "failed", "error", "skipped"))
        terminalreporter.write_line(f"{name}: {counts} in {part['seconds']:.0f}s")
