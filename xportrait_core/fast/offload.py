"""Low-VRAM running: the networks that are idle during sampling stay off the GPU.

Per window and step, sampling needs the UNet (with its motion modules) and both ControlNets. The reference net
depends only on the timestep, so `precompute_reference_banks` runs it for every timestep before sampling and it
can leave: the `StoredReferenceBanks` it returns take the place of the branches' live banks. The VAE works only
before (encode) and after (decode). `place_for_low_vram` puts the model in that arrangement and `resident` brings
one network onto the compute device for a while. The README's speed section has the peak VRAM with and without it.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn as nn

from ..model.reference_bank import ReferenceBank
from ..model.xportrait import XPortrait
from ..sampling.branches import resident_hint_bytes, timestep_key
from . import cuda_graphs as graphs

log = logging.getLogger("xportrait")

# Networks used at every sampling step, kept on the compute device.
SAMPLING_NETWORKS = ("unet", "global_control", "local_control")
# Networks used once per job, kept on the CPU between uses.
IDLE_NETWORKS = ("reference_net", "vae")


# Sampling's working memory beyond the weights it keeps on the GPU (peak allocated minus weights) at 512x512 in
# bf16 with 16-frame windows: the largest of the compiled, eager and low-VRAM measurements (benchmarks/NOTES.md),
# rounded up.
MEASURED_WORKING_BYTES = int(2.6 * 2**30)


def sampling_working_memory(resolution: int, window_frames: int, dtype: torch.dtype, num_frames: int = 0,
                            model_channels: int = 320) -> int:
    """Bytes sampling needs on the GPU beyond the weights, for a host's memory manager to make room for
    (ComfyUI's `load_models_gpu(memory_required=...)`). Activations scale with pixels x window frames x element
    size from the measured case; the encoded motion hints of `num_frames` frames are added while they stay on the
    GPU (branches.resident_hint_bytes)."""
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
    `pin_idle` (host RAM that cannot be swapped out, the size of the reference net and the VAE; their visits then
    copy asynchronously), in ordinary memory otherwise."""
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
    hundreds of tensors was a copy that stalled the host until the GPU had drained its queue."""
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
    so copying them back from the GPU (the whole reference net, each job) would be wasted.
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


class StoredReferenceBanks:
    """Reference banks computed before sampling for every timestep, kept in `stored` {timestep: bank} (pinned host
    memory by default); a step's bank is copied to the device once and kept while that step's windows read it.
    Same banks as the live ones, so the same result."""

    def __init__(self, stored: dict, device: torch.device):
        self.stored = stored
        self.device = device
        self._t = None
        self._bank: Optional[ReferenceBank] = None

    def __call__(self, t) -> ReferenceBank:
        key = timestep_key(t)
        if self._t != key or self._bank is None:
            if key not in self.stored:
                raise KeyError(f"no precomputed reference bank for timestep {t}")
            self._bank = None  # free the previous step's bank before copying the next
            self._bank = self.stored[key].to(self.device)
            self._t = key
        return self._bank

    def release(self) -> None:
        self._bank = self._t = None
        self.stored = {}


def precompute_reference_banks(banks, timesteps, store: torch.device | str = "cpu",
                               cuda_graphs: bool = False) -> StoredReferenceBanks:
    """Every timestep's bank from `banks` (the branches' live `ReferenceBanks`), kept on `store`, so the reference
    net need not stay on the GPU while sampling: put the result in the branches' place,
    `branches.banks = precompute_reference_banks(branches.banks, timesteps, ...)`.

    With `cuda_graphs`, the reference net is recorded after its first timestep and replayed for the others:
    launched eagerly, a batch-1 pass keeps the GPU waiting on the host. The copies out are asynchronous, with one
    synchronisation at the end. Where recording fails, it warns and computes them eagerly."""
    timesteps = [int(t) for t in torch.as_tensor(timesteps).tolist()]
    device = banks.model.device
    try:
        stored = _computed_banks(banks, timesteps, store, cuda_graphs)
    except graphs.GraphCaptureError as error:
        log.warning("X-Portrait: CUDA graph recording failed (%s); reference banks computed without graphs", error)
        stored = _computed_banks(banks, timesteps, store, False)
    return StoredReferenceBanks(stored, device)


def _computed_banks(banks, timesteps: list[int], store, use_graphs: bool) -> dict[int, ReferenceBank]:
    device = banks.model.device
    source = graphs.GuidanceGraphs(device, None, compute_bank=banks.compute) if use_graphs else None
    bank_of = source.reference_bank if source is not None else banks.compute
    stored = {}
    try:
        for t in timesteps:
            stored[t] = bank_of(t).to(store, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the copies to the host have landed
    finally:
        if source is not None:
            source.release()
    return stored
