"""On/off environment switches for the optional fast paths (XPORTRAIT_CUDA_GRAPHS, XPORTRAIT_FRAME_KERNEL,
XPORTRAIT_GROUP_NORM_KERNEL, XPORTRAIT_GEGLU_KERNEL): each is on unless set to 0, false, no or off (any case)."""
from __future__ import annotations

import os

OFF = ("0", "false", "no", "off")


def switched_on(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in OFF
