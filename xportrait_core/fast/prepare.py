"""The one sequence that readies a loaded model for sampling, shared by the CLI, the Load node and the benchmarks:
channels-last memory, then torch.compile, then the low-VRAM placement. Each step is optional, none changes what
the networks compute, and the order is fixed: compiling marks blocks in place whatever their memory format or
device, and the low-VRAM placement moves whole networks, compiled or not."""
from __future__ import annotations

import logging

from ..model.xportrait import XPortrait
from . import compilation, offload

log = logging.getLogger("xportrait")


def prepare_model(model: XPortrait, *, channels_last: bool = False, compile: bool = False,
                  compile_mode: str = "default", regional: bool = True, low_vram: bool = False,
                  pin_idle: bool = True) -> XPortrait:
    """`model`, in place: channels-last memory (cuDNN's convolutions then need no layout conversions), its blocks
    compiled (`compilation.compile_networks`; CUDA only, skipped with a log line elsewhere), and the low-VRAM
    arrangement on its compute device (`offload.place_for_low_vram`, idle networks pinned when `pin_idle`)."""
    if channels_last:
        compilation.use_channels_last(model)
    if compile:
        if model.device.type == "cuda":
            compilation.compile_networks(model, mode=compile_mode, regional=regional)
        else:
            log.info("X-Portrait: compile applies on CUDA GPUs only; running uncompiled on %s", model.device)
    if low_vram:
        offload.place_for_low_vram(model, model.device, pin_idle=pin_idle)
    return model
