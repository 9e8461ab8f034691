"""Low-VRAM running: the networks that are idle during sampling stay off the GPU.

Per window and step, sampling needs the UNet (with its motion modules) and both ControlNets. The reference net
depends only on the timestep, so `GuidedDenoiser.precompute_reference_banks` runs it for every timestep before
sampling and it can leave; the VAE works only before (encode) and after (decode). `place_for_low_vram` puts the
model in that arrangement and `resident` brings one network onto the compute device for a while.

Measured on the H100 (bf16, 512x512, 16 frames): see the README's speed section for the peak VRAM with and
without it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from ..model.xportrait import XPortrait

# Networks used at every sampling step, kept on the compute device.
SAMPLING_NETWORKS = ("unet", "global_control", "local_control")
# Networks used once per job, kept on the CPU between uses.
IDLE_NETWORKS = ("reference_net", "vae")


# Sampling's working memory beyond the weights it keeps on the GPU, measured on the H100 on 2026-11-25 (bf16,
# 512x512, 16-frame windows, peak allocated minus weights): 2.3 GiB compiled and 2.5 GiB eager with both guidance
# branches in one batch (CUDA graphs included), 2.5 GiB in low-VRAM mode. Rounded up.
MEASURED_WORKING_BYTES = int(2.6 * 2**30)


def sampling_working_memory(resolution: int, window_frames: int, dtype: torch.dtype, num_frames: int = 0,
                            model_channels: int = 320) -> int:
    """Bytes sampling needs on the GPU beyond the weights, for a host's memory manager to make room for
    (ComfyUI's `load_models_gpu(memory_required=...)`). Activations scale with pixels x window frames x element
    size from the measured case; the encoded motion hints of `num_frames` frames are added while they stay on the
    GPU (guidance.resident_hint_bytes)."""
    from ..sampling.guidance import resident_hint_bytes

    scale = (resolution / 512) ** 2 * (max(1, window_frames) / 16) * (dtype.itemsize / 2)
    return int(MEASURED_WORKING_BYTES * scale) + resident_hint_bytes(num_frames, resolution, dtype, model_channels)


def gpu_networks(model: XPortrait) -> dict[str, nn.Module]:
    """The networks low-VRAM mode keeps on the compute device: the sampling networks, and the text encoder (it runs
    once, and is small) where the checkpoint has one. A host's memory manager should count these, and only these,
    as the model's weights on the GPU."""
    names = SAMPLING_NETWORKS + (("text_encoder",) if model.text_encoder is not None else ())
    return {name: getattr(model, name) for name in names}


def network_bytes(module: nn.Module) -> int:
    """Bytes of a network's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def low_vram_memory_required(model: XPortrait, working_bytes: int) -> int:
    """GPU bytes low-VRAM sampling needs beyond the networks it keeps there: the sampling activations
    (`working_bytes`, from `sampling_working_memory`), or the largest idle network visiting with room for a
    batch-1 pass (a 32nd of a window's two-branch activations), whichever is more; the two never overlap."""
    largest_visit = max(network_bytes(getattr(model, name)) for name in IDLE_NETWORKS)
    return max(int(working_bytes), largest_visit + int(working_bytes) // 32)


def place_for_low_vram(model: XPortrait, device: torch.device | str, pin_idle: bool = True) -> XPortrait:
    """`gpu_networks` on `device`, the rest on the CPU: in page-locked memory when `device` is a CUDA GPU and
    `pin_idle` (about 1.7 GiB of the host's RAM at bf16 that cannot be swapped out; their visits then copy
    asynchronously), in ordinary memory otherwise."""
    for network in gpu_networks(model).values():
        network.to(device)
    for name in IDLE_NETWORKS:
        getattr(model, name).to("cpu")
    if torch.device(device).type == "cuda":
        if pin_idle:
            for name in IDLE_NETWORKS:
                _pin(getattr(model, name))
        torch.cuda.empty_cache()
    return model


def _pin(network: nn.Module) -> None:
    """Move a network's CPU parameters and buffers into page-locked memory (once; pinned ones stay as they are).

    A visit to the GPU then copies them with DMA, asynchronously: from pageable memory each of the reference net's
    ~700 tensors was a copy that stalled the host until the GPU had drained its queue."""
    for module in network.modules():
        for parameter in module._parameters.values():
            if parameter is not None and parameter.device.type == "cpu" and not parameter.is_pinned():
                parameter.data = parameter.data.pin_memory()
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type == "cpu" and not buffer.is_pinned():
                module._buffers[name] = buffer.pin_memory()


def is_low_vram(model: XPortrait) -> bool:
    """Whether the model is arranged by `place_for_low_vram` (idle networks apart from the compute device)."""
    return any(_device_of(getattr(model, name)) != model.device for name in IDLE_NETWORKS)


@contextmanager
def resident(model: XPortrait, name: str) -> Iterator[nn.Module]:
    """Network `name` on the model's compute device inside the block; back where it was after, memory freed.

    The weights at home are kept while the network visits and put back afterwards: the visit changes no weight,
    so copying them back from the GPU (1.6 GiB for the reference net in bf16, each job) would be wasted.
    """
    network = getattr(model, name)
    home = _device_of(network)
    if home == model.device:
        yield network
        return
    at_home = _tensors_of(network)
    # Asynchronous from pinned memory (`place_for_low_vram` pins the idle networks); ordered before the network's
    # first kernel on the same stream.
    network.to(model.device, non_blocking=True)
    try:
        yield network
    finally:
        _put_back(at_home)
        if model.device.type == "cuda":
            torch.cuda.empty_cache()


def _tensors_of(network: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """(module, name, is_parameter, data) of every parameter and buffer, as they are now."""
    held = []
    for module in network.modules():
        held += [(module, n, True, p.data) for n, p in module._parameters.items() if p is not None]
        held += [(module, n, False, b) for n, b in module._buffers.items() if b is not None]
    return held


def _put_back(held: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> None:
    for module, name, is_parameter, data in held:
        if not is_parameter:
            module._buffers[name] = data
            continue
        parameter = module._parameters[name]
        if torch._has_compatible_shallow_copy_type(parameter, data):
            parameter.data = data  # the same Parameter object, its home tensor again (CUDA and CPU tensors)
        else:  # as Module.to does between tensor types that cannot share a Parameter (e.g. meta)
            module._parameters[name] = nn.Parameter(data, requires_grad=parameter.requires_grad)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
