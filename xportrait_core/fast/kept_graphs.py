"""CUDA graphs kept from one sampling run to the next: KSampler's window graphs, and our Sampler's.

A graphed run spends its first two window calls on an eager warm-up and on recording, with the GPU mostly idle
(benchmarks/NOTES.md, session 21). A ComfyUI user re-runs a graph with another seed, prompt, reference or driving
video of the same size, and nothing the graphs hold by address has moved: the same weights, window shapes and
settings. `KeptWindowGraphs.serve(branches)` hands such a run the `WindowGraphs` of the previous one, its
reference latents and texts copied into the tensors the graphs read (`WindowGraphs.adopt`), so every window of it
replays; any other run gets new graphs and the old ones are released.

What must match (`run_signature`): the model object and the address of every weight of the four networks the
graphs run (ComfyUI replaces a weight's tensor when it patches a LoRA in or moves the model, and patches in place
otherwise, which the graphs then read as they should), the shapes, dtypes and devices of the reference latents and
texts, whether both branches share one text, the ControlNets' strengths (recorded as constants) and whether the
hints are encoded. The graphs' first recording takes private copies of the latents and texts, so a later run's
copy never writes into a tensor that ComfyUI keeps (its cached text conditioning, say).

Short runs. A run of fewer than `cuda_graphs.MIN_GRAPHED_STEPS` steps does not repay a recording on its own
(`cuda_graphs.repays_recording`), so it runs eagerly, and its signature is remembered. A short run whose signature
is the remembered one repeats the previous run (a user re-queueing the same workflow with another seed, say): such
runs keep coming, so it records the graphs and keeps them, and every later run that fits them replays them from
its first window, whatever its length. A run that fits kept graphs is always served them.

Kept graphs hold their memory pool between runs: the owner releases them, and forgets the remembered run, when
ComfyUI moves the model off the device (nodes/native/adapter.py registers that), when graphs do not apply to a
run, or when its sampling fails.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import cuda_graphs
from .cuda_graphs import GraphedDenoiser, WindowGraphs

NETWORKS = ("unet", "reference_net", "global_control", "local_control")


def _tensor_key(tensor: Optional[torch.Tensor]):
    return None if tensor is None else (tuple(tensor.shape), tensor.dtype, str(tensor.device))


# Per network, where each of its weights is held: (a module's parameter or buffer dict, the name in it). Walking a
# network's modules for its parameters takes milliseconds of Python at every run; these slots are read directly.
# A host replaces a weight by storing another tensor in such a slot (ComfyUI's LoRA patching and loading), or
# another storage in the same tensor (`.data =`, a move): both change the address read through the slot.
_weight_slots: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def weight_slots(network: torch.nn.Module) -> tuple:
    """The (dict, name) slots of every parameter and buffer of `network`, collected once."""
    slots = _weight_slots.get(network)
    if slots is None:
        slots = _weight_slots[network] = tuple((held, name) for module in network.modules()
                                               for held in (module._parameters, module._buffers) for name in held)
    return slots


def weight_addresses(network: torch.nn.Module) -> tuple:
    """The address of each of the network's weights (0 for an empty slot)."""
    return tuple(0 if held[name] is None else held[name].data_ptr() for held, name in weight_slots(network))


def run_signature(branches) -> tuple:
    """What a run's `XPortraitBranches` must share with the run the graphs were recorded for."""
    model = branches.model
    addresses = tuple(weight_addresses(getattr(model, name)) for name in NETWORKS
                      if getattr(model, name, None) is not None)
    hints = branches.motion_hints
    return (id(model), addresses, _tensor_key(branches.banks.reference_latents), _tensor_key(branches.context),
            _tensor_key(branches.uncond_context), branches.uncond_context is branches.context,
            hints.global_hint is not None, hints.local_hint is not None, hints.global_strength,
            hints.local_strength, hints.encoded)


def _take_private_copies(branches) -> None:
    """Give `branches` its own copies of what the graphs read by address and a later run overwrites."""
    shared = branches.uncond_context is branches.context
    branches.context = branches.context.clone()
    branches.banks.context = branches.context
    if branches.uncond_context is not None:
        branches.uncond_context = branches.context if shared else branches.uncond_context.clone()
    branches.banks.reference_latents = branches.banks.reference_latents.clone()


class KeptWindowGraphs:
    """One set of window graphs, kept across sampling runs while each run fits them, and the signature of the last
    run (module docstring)."""

    def __init__(self):
        self._graphs: Optional[WindowGraphs] = None
        self._signature: Optional[tuple] = None  # the last run's: of the kept graphs, or of an eager run
        self.served_again = 0  # runs served with graphs recorded by an earlier run
        self.recordings = 0    # sets of graphs made (each recorded during its first run)

    @property
    def graphs(self) -> Optional[WindowGraphs]:
        return self._graphs

    def serve(self, branches, steps: Optional[int] = None, graphs_apply: bool = True) -> Optional[WindowGraphs]:
        """The window graphs for a run of `branches` and `steps` steps (None: not known): the kept ones where the
        run fits them; new ones where the run repays them or repeats the last run; None (run eagerly) otherwise,
        or where graphs do not apply to the run (`graphs_apply` False: they are released then)."""
        if not graphs_apply:
            self.release()
            return None
        signature = run_signature(branches)
        if self._signature == signature:
            if self._graphs is not None:
                if self._graphs.enabled:  # a failed recording stays failed for runs like it: no retry every run
                    self._graphs.adopt(branches)
                    self.served_again += 1
                return self._graphs
            repeat = True  # the last run was this one, run eagerly
        else:
            repeat = False
        self.release()
        self._signature = signature
        if not (repeat or cuda_graphs.repays_recording(steps)):
            return None
        _take_private_copies(branches)
        self._graphs = WindowGraphs(branches)
        self.recordings += 1
        return self._graphs

    def release(self) -> None:
        """Drop the graphs and their memory, and forget the last run."""
        if self._graphs is not None:
            self._graphs.release()
        self._graphs = self._signature = None


class KeptSamplerGraphs:
    """Our Sampler's graphed denoiser, kept across runs while each run fits it: the same rules as
    `KeptWindowGraphs` (module docstring), for `sampling.pipeline.animate_latents(..., kept_graphs=...)`.

    What must match besides `run_signature`: the guidance scale (a constant of the recording) and whether the
    branches run as one batch. The owner (X-Portrait Load Model's handle) releases the graphs when ComfyUI unloads
    the model; a failed or cancelled run releases them too."""

    def __init__(self):
        self._graphed: Optional[GraphedDenoiser] = None
        self._signature: Optional[tuple] = None  # the last run's: of the kept graphs, or of an eager run
        self.served_again = 0
        self.recordings = 0

    @property
    def graphed(self) -> Optional[GraphedDenoiser]:
        return self._graphed

    def serve(self, denoiser, steps: Optional[int] = None, graphs_apply: bool = True):
        """What samples the run of `denoiser` (a `GuidedDenoiser`): the kept graphed denoiser where the run fits
        it (it adopts the run's inputs), a new one where the run repays a recording or repeats the last run, the
        denoiser itself otherwise (eager), or where graphs do not apply (the kept graphs are released then)."""
        if not graphs_apply or not denoiser.needs_cond:
            self.release()
            return denoiser
        signature = (run_signature(denoiser.branches), denoiser.guidance_scale, denoiser.batch_branches)
        if self._signature == signature:
            if self._graphed is not None:
                if self._graphed.enabled:
                    self._graphed.adopt(denoiser)
                    self.served_again += 1
                    return self._graphed
                return denoiser  # its recording failed: runs like it stay eager, no retry every run
            repeat = True
        else:
            repeat = False
        self.release()
        self._signature = signature
        if not (repeat or cuda_graphs.repays_recording(steps)):
            return denoiser
        _take_private_copies(denoiser.branches)
        self._graphed = GraphedDenoiser(denoiser)
        self.recordings += 1
        return self._graphed

    def end_run(self, denoise, failed: bool) -> None:
        """The run sampled with `denoise` (what `serve` gave) ended: a failed or cancelled one drops the graphs;
        otherwise the run's own caches go and the graphs stay."""
        if failed:
            self.release()
            denoise.release()
        elif denoise is self._graphed:
            denoise.end_run()
        else:
            denoise.release()

    def release(self) -> None:
        """Drop the graphs and their memory, and forget the last run."""
        if self._graphed is not None:
            self._graphed.release()
        self._graphed = self._signature = None
