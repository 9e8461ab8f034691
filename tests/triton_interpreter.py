"""Runs code under Triton's CPU interpreter, in a process of its own (the interpreter is chosen when Triton loads).

Triton is a test dependency on Linux x86-64: under CI its absence fails the calling test; elsewhere it skips it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from pack_loader import ROOT

PREAMBLE = 'import json, os, sys\nos.environ["TRITON_INTERPRET"] = "1"\nimport torch\ntorch.manual_seed(0)\n'


def run_interpreted(body: str, *args: str):
    """The JSON that `body` prints last (after PREAMBLE, with the repository importable and `args` in argv)."""
    if importlib.util.find_spec("triton") is None and not os.environ.get("CI"):
        pytest.skip("triton is not installed (it is a test dependency on Linux x86-64)")
    run = subprocess.run([sys.executable, "-c", PREAMBLE + body, *args], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
