"""The switch table: every environment variable that picks a path through the pack, its default and its effect.

Each switch changes how the networks run, never what they compute. Every reader of one of these variables goes
through `setting` or `switched_on` below, and the README's "Environment switches" section lists the same names
(tests/unit/test_switches.py checks both ways). The table sits outside `model/` and `fast/` because both read it:
the attention dispatch (`model/attention.py`) and the kernels, CUDA graphs and their probes (`fast/`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Switch:
    name: str
    default: str
    choices: tuple[str, ...]
    effect: str


ON_OFF = ("1", "0")
# Values that turn an on/off switch off (any case); anything else leaves it on.
OFF = ("0", "false", "no", "off")

SWITCHES: tuple[Switch, ...] = (
    Switch("XPORTRAIT_ATTENTION", "auto", ("auto", "xformers", "sdpa", "math"),
           "Attention backend. auto: xformers where it imports and a probe call runs, else PyTorch's "
           "scaled_dot_product_attention; xformers or sdpa force one (a forced xformers that cannot run is an "
           "error); math: explicit float32 softmax, for checking the others, and no frame-attention kernel."),
    Switch("XPORTRAIT_CUDA_GRAPHS", "1", ON_OFF,
           "Record each window's UNet and ControlNet calls as CUDA graphs and replay them (CUDA only, with an "
           "allocator that supports it); 0 runs every window eagerly."),
    Switch("XPORTRAIT_FRAME_KERNEL", "1", ON_OFF,
           "The Triton kernel for the motion modules' attention along frames (CUDA half precision, short "
           "sequences); 0 leaves those sequences to the attention backend."),
    Switch("XPORTRAIT_GROUP_NORM_KERNEL", "1", ON_OFF,
           "The Triton GroupNorm kernel for channels-last CUDA half-precision activations outside torch.compile; "
           "0 uses PyTorch's GroupNorm."),
    Switch("XPORTRAIT_GEGLU_KERNEL", "1", ON_OFF,
           "The Triton kernel for the feed-forward's value * gelu(gate) on CUDA half precision outside "
           "torch.compile and autograd; 0 uses PyTorch's gelu and multiply."),
    Switch("XPORTRAIT_LAYER_NORM_KERNEL", "1", ON_OFF,
           "The Triton LayerNorm kernel (one read and one write of each row) for CUDA half-precision activations "
           "outside torch.compile and autograd; 0 uses PyTorch's LayerNorm."),
    Switch("XPORTRAIT_CONV_BIAS_KERNEL", "1", ON_OFF,
           "Convolutions on channels-last CUDA half-precision activations run without their bias, which a Triton "
           "pass adds (with a ResBlock's skip, or folded into the next GroupNorm); 0 leaves the bias to PyTorch."),
)

_BY_NAME = {switch.name: switch for switch in SWITCHES}


def switch(name: str) -> Switch:
    """The table's entry for `name`."""
    return _BY_NAME[name]


def setting(name: str) -> str:
    """The switch's value from the environment (lower case, stripped), or its default; an unknown value of a
    multiple-choice switch is an error that names the choices."""
    switch = _BY_NAME[name]
    value = os.environ.get(name, "").strip().lower() or switch.default
    if switch.choices != ON_OFF and value not in switch.choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(switch.choices)}")
    return value


def switched_on(name: str) -> bool:
    """Whether an on/off switch is on: it is unless set to 0, false, no or off (any case)."""
    if _BY_NAME[name].choices != ON_OFF:
        raise ValueError(f"{name} is not an on/off switch")
    return setting(name) not in OFF
