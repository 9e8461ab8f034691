"""CUDA graphs of the guided denoiser's GPU work: record the kernels once, replay them at every window.

`with_cuda_graphs(denoiser)` wraps a `sampling.guidance.GuidedDenoiser` in a `GraphedDenoiser` where graphs can
run (a CUDA device, an allocator they record under, XPORTRAIT_CUDA_GRAPHS not 0): the same
`denoise(x, t, frame_indices)`, whose window work replays from graphs of the denoiser's own `window_eps` and its
banks' `compute` (or their `stored` banks).

A guided window step launches thousands of kernels (four networks); eagerly, and even more so through the guards
of `torch.compile`'s regions, the host takes about as long to launch them as the GPU takes to run them, and the
GPU waits. A CUDA graph replays the whole recorded sequence with one launch. Two graphs are recorded, sharing one
memory pool:

    reference graph   static timestep -> reference bank                          (replayed once per timestep)
    window graph      static window latents, timestep, hints, bank -> guided eps  (replayed for every window)

Banks computed outside the graphs come as `stored` banks instead of a reference graph: in low-VRAM mode (the
reference net has left the GPU; the banks were computed before sampling) and on the uncompiled path, whose banks
come a chunk of timesteps per reference-net call (sampling/batched_banks.py). Each step's bank is then copied into
one bank of fixed addresses; in low-VRAM mode the window graph holds both guidance branches one after the other
(their activations share the graph's memory, as they would eagerly).

The first call of each runs eagerly, on the caller's stream, and returns its real result: that is the warm-up
recording needs (lazy cuBLAS/cuDNN set-up, Triton and Inductor compilation, the attention probes), so no work is
thrown away. Recording and replays run on a side stream (graphs cannot be recorded on the default stream),
ordered after and before the caller's stream. Every input is copied into a static buffer before a replay;
everything else the graphs read (weights, contexts, reference latents) must keep its address while they live, so
graphs last one sampling run (`GraphedDenoiser.release` drops them and their memory pool; kept graphs outlive
it: fast/kept_graphs.py). Where recording fails (a host sync inside the step, say) `GraphCaptureError`
says so and `GraphedDenoiser` goes on with the eager denoiser.

Under `backend:cudaMallocAsync` (ComfyUI's default on CUDA) the memory a recording allocates is not mapped yet
while it records, and Triton's kernel launcher rejects those pointers; freeing the tensors of the failed recording
then aborted the process (seen on the H100 with torch 2.11). The pack's own Triton kernels are therefore launched
by address while a recording is under way (triton_launch.py), so an uncompiled model records there too. Compiled
blocks launch Inductor's kernels through Triton's own launcher: under that allocator they are not recorded (see
`allocator_supports_graphs`).

Recording costs about one eager step of host time with the GPU idle, and a replay saves only the host's lead over
the GPU, so a short run loses: graphs serve runs of at least `MIN_GRAPHED_STEPS` steps (benchmarks/NOTES.md),
except that KSampler's kept graphs also serve a short run that repeats the previous one (fast/kept_graphs.py).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import compilation, triton_launch
from .switches import switched_on

log = logging.getLogger("xportrait")

# Runs of fewer steps stay eager. Measured on one H200 under ComfyUI's allocator: 6 LCM steps were slower with
# graphs, 30 DDIM steps faster through KSampler; the bar sits between the two.
MIN_GRAPHED_STEPS = 20


def cuda_graphs_enabled() -> bool:
    """False when XPORTRAIT_CUDA_GRAPHS=0 (or false/no/off): every window then runs eagerly."""
    return switched_on("XPORTRAIT_CUDA_GRAPHS")


_logged_allocator_note = False


def allocator_supports_graphs(compiled: bool = False, cuda_malloc_async: bool = True) -> bool:
    """True under PyTorch's native CUDA allocator, and under cudaMallocAsync (unless the caller says
    `cuda_malloc_async=False`) for an uncompiled model where this Triton lets the pack's kernels launch by address
    (triton_launch.py). Otherwise it logs, once, how to get graphs back."""
    global _logged_allocator_note
    backend = torch.cuda.memory.get_allocator_backend() if torch.cuda.is_available() else "native"
    if backend == "native":
        return True
    if not cuda_malloc_async:
        return False
    # A failed recording may abort the process under this allocator, so only a run whose every kernel is known
    # to record: not compiled blocks, and not PyTorch's attention replaced by another pack's (often a Triton
    # kernel launched the ordinary way).
    if compiled:
        reason = "compiled blocks' recordings cannot be replayed there"
    elif not triton_launch.capture_safe():
        reason = "this Triton's kernels cannot be recorded there"
    elif F.scaled_dot_product_attention is not torch._C._nn.scaled_dot_product_attention:
        reason = "another node replaced PyTorch's attention, whose kernels may not record there"
    else:
        return True
    if not _logged_allocator_note:
        _logged_allocator_note = True
        log.info("X-Portrait: CUDA graphs are off under the %s allocator (%s); sampling runs without them. Start "
                 "ComfyUI with --disable-cuda-malloc (and PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) for "
                 "faster sampling with less reserved memory.", backend, reason)
    return False


def release_stuck_generators() -> None:
    """After a failed recording, let the CUDA random generators draw again outside recordings.

    When a recording fails, PyTorch ends the capture without telling the default CUDA generators, and each then
    refuses every later draw outside a recording ("Offset increment outside graph capture encountered
    unexpectedly"; seen on the H200, torch 2.11, when a recording compiled code): any node's `torch.randn` on
    the GPU would fail until some recording succeeds. Each generator gets a fresh copy of its state (same seed
    and offset, not capturing). Graphs recorded earlier keep the old state, so a failed run's graphs must all be
    released, as the denoiser does."""
    for generator in getattr(torch.cuda, "default_generators", ()):
        try:
            generator.graphsafe_set_state(generator.clone_state())
        except Exception as error:  # a PyTorch without graph-safe generator states (before 2.4)
            log.debug("X-Portrait: could not reset a CUDA generator after a failed recording: %s", error)


class GraphCaptureError(RuntimeError):
    """The denoiser's work could not be recorded as a CUDA graph (the eager path still works)."""


def _shape_of(value):
    """What `_empty_like` needs of a window's eps (a tensor) or of a reference bank (its entries)."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return value.num_references, [torch.empty(e.shape, dtype=e.dtype, device="meta") for e in value.entries]


def _empty_like(shape, device: torch.device):
    """Uninitialised storage on `device` shaped as `_shape_of` describes."""
    if isinstance(shape, torch.Tensor):
        return torch.empty(shape.shape, dtype=shape.dtype, device=device)
    from ..model.reference_bank import ReferenceBank  # noqa: PLC0415 - keeps this module free of the model

    num_references, entries = shape
    bank = ReferenceBank(num_references)
    bank.entries = [torch.empty(e.shape, dtype=e.dtype, device=device) for e in entries]
    return bank.finish()


def _copy_into(target, value) -> None:
    """target <- value, for a tensor or a bank; shapes as the warm-up gave them (a recording of other shapes is a
    mistake in the caller)."""
    if isinstance(target, torch.Tensor):
        target.copy_(value)
        return
    if len(target.entries) != len(value.entries):
        raise RuntimeError(f"a bank of {len(value.entries)} entries recorded where the warm-up had "
                           f"{len(target.entries)}")
    for stored, entry in zip(target.entries, value.entries):
        stored.copy_(entry)


class _Recorded:
    """One recorded graph, the static tensors it reads, and its (static) output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], output):
        self.graph, self.inputs, self.output = graph, inputs, output

    def replay(self, values: dict[str, torch.Tensor]):
        for name, value in values.items():
            self.inputs[name].copy_(value, non_blocking=True)
        self.graph.replay()
        return self.output


class GuidanceGraphs:
    """The reference and window graphs of one sampling run.

    window_eps(x, t, global_hint, local_hint, bank) -> eps is the eager computation of one window, with t a device
    tensor of shape (1,) (None where only `reference_bank` is used). The reference bank it reads comes from one of:
      compute_bank(t) -> ReferenceBank   the reference net, recorded as the reference graph; or
      stored_banks {timestep: bank}      banks computed outside the graphs (before sampling in low-VRAM mode, or a
                                         chunk of timesteps per reference-net call: batched_banks.py), copied at
                                         each step into a bank of fixed addresses on the device.
    Windows of another shape or other hints get their own window graph.
    """

    def __init__(self, device: torch.device, window_eps: Optional[Callable], compute_bank: Optional[Callable] = None,
                 stored_banks: Optional[dict] = None):
        if (compute_bank is None) == (stored_banks is None):
            raise ValueError("give exactly one of compute_bank and stored_banks")
        self.device = device
        self._compute_bank = compute_bank
        self._stored_banks = stored_banks
        self._window_eps = window_eps
        self._stream = torch.cuda.Stream(device=device)
        self._timestep = torch.zeros(1, dtype=torch.long, device=device)
        self._bank = None                       # the bank of timestep _bank_t (eager, or of fixed addresses)
        self._bank_t: Optional[int] = None
        self._bank_graph: Optional[_Recorded] = None
        self._static_bank = None                # stored banks' values land here, step by step
        self._window_graphs: dict[tuple, _Recorded] = {}
        self._warm: dict = {}                   # what has run eagerly once, so may be recorded: its result's shape
        self._pool = None
        self.replays = 0

    def _record(self, fn: Callable[[], object], like):
        """Record fn() -> a tensor or a bank shaped as `like` (the eager warm-up's result). The graph writes into
        buffers allocated before it, and fn's own result is dropped inside the recording: under cudaMallocAsync
        every recorded allocation freed after the recording draws a PyTorch warning, at every run."""
        # The eager warm-up's freed blocks stay cached by the allocator, where the graphs' private pool cannot
        # reuse them: hand them back to the driver first, or the run would hold the step's memory twice.
        torch.cuda.empty_cache()
        with torch.cuda.stream(self._stream):
            output = _empty_like(like, self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                result = fn()
                _copy_into(output, result)
                del result
        except Exception as error:  # e.g. a host sync or a pageable host copy inside the step
            release_stuck_generators()
            raise GraphCaptureError(f"{type(error).__name__}: {error}") from error
        if self._pool is None:
            self._pool = graph.pool()
        return graph, output

    @property
    def _bank_fixed(self) -> bool:
        """Whether the bank windows read keeps its addresses from now on, so window graphs may be recorded."""
        return self._bank_graph is not None or self._static_bank is not None

    def _stored_bank_of(self, t: int):
        if t not in self._stored_banks:
            raise KeyError(f"no precomputed reference bank for timestep {t}")
        stored = self._stored_banks[t]
        if self._static_bank is None:
            self._static_bank = _empty_like(_shape_of(stored), self.device)
        # On the caller's stream, which waited for the last replay that read the previous step's values; pinned
        # host banks copy without stalling the host.
        for target, entry in zip(self._static_bank.entries, stored.entries):
            target.copy_(entry, non_blocking=True)
        self._timestep.fill_(int(t))
        return self._static_bank

    def _bank_of(self, t: int, caller: torch.cuda.Stream):
        if self._bank_t == t:
            return self._bank
        if self._stored_banks is not None:
            self._bank = self._stored_bank_of(t)
        elif self._bank_graph is None and "bank" not in self._warm:
            # Warm-up: eagerly, on the caller's stream (whose cached memory later work reuses).
            self._timestep.fill_(int(t))  # a fill kernel: the value travels as a launch argument, no host copy
            self._bank = self._compute_bank(self._timestep)
            self._warm["bank"] = _shape_of(self._bank)
        else:
            self._stream.wait_stream(caller)
            with torch.cuda.stream(self._stream):
                self._timestep.fill_(int(t))
                if self._bank_graph is None:
                    self._bank = None  # the eager bank's memory goes back before recording
                    graph, bank = self._record(lambda: self._compute_bank(self._timestep), self._warm["bank"])
                    self._bank_graph = _Recorded(graph, {}, bank)
                self._bank = self._bank_graph.replay({})
            caller.wait_stream(self._stream)
        self._bank_t = t
        return self._bank

    def reference_bank(self, t: int):
        """The bank of timestep t (live banks only): eager the first time, recorded the second, replayed after.
        Its tensors are the graph's output, overwritten by the next timestep's replay: copy what must outlive it
        on the caller's stream (the replay waits for what was queued there before it)."""
        if self._compute_bank is None:
            raise RuntimeError("reference_bank needs graphs of live banks (compute_bank)")
        return self._bank_of(int(t), torch.cuda.current_stream(self.device))

    def eps(self, x: torch.Tensor, t: int, global_hint: Optional[torch.Tensor] = None,
            local_hint: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The eps of one window, as a fresh tensor on the caller's stream."""
        caller = torch.cuda.current_stream(self.device)
        bank = self._bank_of(t, caller)
        hints = {name: h for name, h in (("global_hint", global_hint), ("local_hint", local_hint)) if h is not None}
        inputs = {"x": x, **hints}
        key = tuple((name, tuple(v.shape), v.dtype) for name, v in inputs.items())
        recorded = self._window_graphs.get(key)
        if recorded is None and (key not in self._warm or not self._bank_fixed):
            # Eager until this shape has run once and the bank it reads keeps its addresses.
            eps = self._window_eps(x.to(self.device), self._timestep, global_hint, local_hint, bank)
            self._warm[key] = _shape_of(eps)
            return eps
        self._stream.wait_stream(caller)  # inputs written on the caller's stream are ready
        with torch.cuda.stream(self._stream):
            if recorded is None:
                static = {name: v.to(self.device).clone() for name, v in inputs.items()}
                graph, output = self._record(lambda: self._window_eps(
                    static["x"], self._timestep, static.get("global_hint"), static.get("local_hint"), bank),
                    self._warm[key])
                recorded = self._window_graphs[key] = _Recorded(graph, static, output)
            eps = recorded.replay(inputs)
        caller.wait_stream(self._stream)
        self.replays += 1
        # A copy on the caller's stream: the next replay overwrites the graph's output buffer.
        return eps.clone()

    def forget_bank(self) -> None:
        """The next call computes (or replays) its timestep's bank afresh: the reference or the text changed."""
        self._bank_t = None

    @property
    def reads_stored_banks(self) -> bool:
        """Whether the bank comes from stored banks (else from the recorded reference net)."""
        return self._stored_banks is not None

    def use_stored_banks(self, stored_banks) -> None:
        """Read the stored banks of another run from now on (kept graphs serving it: fast/kept_graphs.py); they
        land in the same fixed bank, so the window graphs recorded so far stay valid."""
        if self._stored_banks is None:
            raise RuntimeError("these graphs record the reference net; they have no stored banks to replace")
        self._stored_banks = stored_banks
        self._bank_t = None

    def release(self) -> None:
        """Drop the graphs and return their memory pool to the driver (a released pool's blocks would otherwise
        stay reserved, out of reach of the VAE decode that follows sampling)."""
        self._bank = self._bank_graph = self._static_bank = None
        self._stored_banks = None
        self._window_graphs.clear()
        self._warm.clear()
        self._pool = None
        torch.cuda.empty_cache()


def repays_recording(steps: Optional[int]) -> bool:
    """Whether a run of `steps` steps repays, on its own, the recording of its graphs (`MIN_GRAPHED_STEPS`; None:
    the length is not known, graphs serve). The one place of the rule; KSampler's kept graphs
    (fast/kept_graphs.py) make their one exception to it, for a repeated run."""
    return steps is None or steps >= MIN_GRAPHED_STEPS


def graphs_apply(device: torch.device, compiled: bool = False, steps: Optional[int] = None,
                 cuda_malloc_async: bool = True) -> bool:
    """Whether CUDA graphs can serve sampling on `device`: a CUDA device, graphs switched on, an allocator they
    record under (`allocator_supports_graphs`; cuda_malloc_async=False keeps that allocator's runs eager), and a
    run of `steps` steps that repays the recording (`repays_recording`; None: not checked here, as for a caller
    that does not know the length, or one that applies the rule itself)."""
    if not repays_recording(steps):
        return False
    return (torch.device(device).type == "cuda" and cuda_graphs_enabled()
            and allocator_supports_graphs(compiled=compiled, cuda_malloc_async=cuda_malloc_async))


def with_cuda_graphs(denoiser, steps: Optional[int] = None, cuda_malloc_async: bool = True):
    """`denoiser` (a `GuidedDenoiser`) behind CUDA graphs where they can run for a run of `steps` steps (as
    `graphs_apply`), else `denoiser` itself. A scale of 0 (the unconditional branch alone, no bank) stays eager."""
    model = denoiser.branches.model
    if denoiser.needs_cond and graphs_apply(model.device, compiled=compilation.is_compiled(model), steps=steps,
                                            cuda_malloc_async=cuda_malloc_async):
        return GraphedDenoiser(denoiser)
    return denoiser


def _copy_run_inputs(static, branches):
    """Copy another run's reference latents and texts (`branches`) into the tensors the recorded run's `static`
    branches hold, which the graphs read; returns the other run's stored banks (None where its banks are computed
    by the reference net itself)."""
    static.banks.reference_latents.copy_(branches.banks.reference_latents)
    static.context.copy_(branches.context)
    if static.uncond_context is not None and static.uncond_context is not static.context:
        static.uncond_context.copy_(branches.uncond_context)
    return getattr(branches.banks, "stored", None)


class GraphedDenoiser:
    """A `GuidedDenoiser` whose window work replays from CUDA graphs: `denoise(x_window, t, frame_indices)` as the
    denoiser's, t an int.

    The graphs record the denoiser's `window_eps` on the window's hint frames, reading the bank of its branches'
    `banks`: live banks are recorded as the reference graph, banks precomputed for every timestep (they have a
    `stored` dict) are copied into fixed buffers at each step. Where recording fails it warns once, drops its
    graphs and calls the denoiser from then on (`enabled` False).
    """

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.enabled = True
        self._graphs: Optional[GuidanceGraphs] = None
        self._graphs_banks = None  # the bank source the graphs were made for

    @property
    def replays(self) -> int:
        return self._graphs.replays if self._graphs is not None else 0

    def _graphs_of(self, banks) -> "GuidanceGraphs":
        if self._graphs is not None and self._graphs_banks is not banks:
            # The banks were replaced (precomputed, say): graphs recorded so far read the old ones.
            self._graphs.release()
            self._graphs = None
        if self._graphs is None:
            stored = getattr(banks, "stored", None)
            source = {"stored_banks": stored} if stored is not None else {"compute_bank": banks.compute}
            self._graphs = GuidanceGraphs(self.denoiser.branches.model.device, self.denoiser.window_eps, **source)
            self._graphs_banks = banks
        return self._graphs

    def _graphed_eps(self, x: torch.Tensor, t: int, frame_indices: torch.Tensor) -> Optional[torch.Tensor]:
        """The window's eps through the graphs, or None where they could not be recorded."""
        branches = self.denoiser.branches
        graphs = self._graphs_of(branches.banks)
        try:
            return graphs.eps(x, t, *branches.motion_hints.frames(frame_indices))
        except GraphCaptureError as error:
            log.warning("X-Portrait: CUDA graph recording failed (%s); sampling continues without graphs", error)
            self.enabled = False
            self._release_graphs()
            return None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: int, frame_indices: torch.Tensor) -> torch.Tensor:
        eps = self._graphed_eps(x, t, frame_indices) if self.enabled else None
        return eps if eps is not None else self.denoiser(x, t, frame_indices)

    def _release_graphs(self) -> None:
        if self._graphs is not None:
            self._graphs.release()
        self._graphs = self._graphs_banks = None

    def adopt(self, denoiser) -> None:
        """Serve another run's `denoiser` (same model, shapes and settings: fast/kept_graphs.py checks) with the
        graphs recorded so far: its reference latents and texts are copied into the tensors the graphs read, its
        hints are read from now on, banks computed outside the graphs come from its own source, and no bank of the
        last run is reused."""
        static, branches = self.denoiser.branches, denoiser.branches
        stored = _copy_run_inputs(static, branches)
        static.motion_hints = branches.motion_hints
        if self._graphs is not None:
            if stored is not None and self._graphs.reads_stored_banks:
                if static.banks is not branches.banks:
                    static.banks.release()
                static.banks = self._graphs_banks = branches.banks
                self._graphs.use_stored_banks(stored)
            self._graphs.forget_bank()

    def end_run(self) -> None:
        """What one run cached goes (its banks, its hint features: the graphs read copies of a window's hints); the
        graphs stay, for kept graphs' next run, which `adopt`s its own."""
        self.denoiser.release()
        self.denoiser.branches.motion_hints = None

    def release(self) -> None:
        """Drop the graphs and their memory pool, and the denoiser's cached banks (when sampling ends or is
        cancelled)."""
        self._release_graphs()
        self.denoiser.release()


class WindowGraphs:
    """The window calls of a host's sampler (`sampling.video_denoiser.VideoDenoiser`: ComfyUI's KSampler) through
    CUDA graphs, as `GraphedDenoiser` serves our Sampler.

    `__call__(kind, x, t, frame_indices)`: kind "both" gives (conditional, unconditional) eps of one UNet batch,
    "cond" the conditional eps alone (cfg 1: the LCM path); None where the caller must run the window eagerly (a
    recording failed, so graphs are off for the rest of the run). Each kind records its own window graphs and a
    reference graph per timestep shape, like the Sampler's; timesteps are the network's integer ones (ComfyUI's
    `timestep()` of each sigma).
    """

    def __init__(self, branches):
        self.branches = branches
        self.motion_hints = branches.motion_hints  # the run's hint frames, copied into the graphs at every call
        self.enabled = True
        self._graphs: dict[str, GuidanceGraphs] = {}

    def adopt(self, branches) -> None:
        """Serve another run's `branches` with the graphs recorded so far (fast/kept_graphs.py checks that they
        fit): its reference latents and texts are copied into the tensors the graphs read, its hints are read from
        now on, and no bank of the last run is reused."""
        static = self.branches
        stored = _copy_run_inputs(static, branches)
        self.motion_hints = branches.motion_hints
        # Banks computed outside the graphs (batched_banks.py) come from the new run's own source, planned for its
        # timesteps; the last run's chunk goes, unless the new run carries on with the same banks
        # (sampling/carried_branches.py).
        if stored is not None and static.banks is not branches.banks:
            static.banks.release()
        for graphs in self._graphs.values():
            if stored is not None and graphs.reads_stored_banks:
                graphs.use_stored_banks(stored)
            graphs.forget_bank()

    @property
    def replays(self) -> int:
        return sum(graphs.replays for graphs in self._graphs.values())

    def _graphs_for(self, kind: str) -> GuidanceGraphs:
        graphs = self._graphs.get(kind)
        if graphs is None:
            branches = self.branches
            if kind == "both":
                def window_eps(x, t, global_hint, local_hint, bank):
                    # One tensor out (a graph's output): the two branches side by side on the channel axis.
                    return torch.cat(branches.eps_branches(x, t, global_hint, local_hint, bank), dim=1)
            elif kind == "cond":
                window_eps = branches.eps_cond
            else:
                raise ValueError(f"unknown window kind {kind!r}: expected 'both' or 'cond'")
            stored = getattr(branches.banks, "stored", None)
            source = {"stored_banks": stored} if stored is not None else {"compute_bank": branches.banks.compute}
            graphs = self._graphs[kind] = GuidanceGraphs(branches.model.device, window_eps, **source)
        return graphs

    @torch.no_grad()
    def __call__(self, kind: str, x: torch.Tensor, t, frame_indices: torch.Tensor):
        if not self.enabled:
            return None
        try:
            eps = self._graphs_for(kind).eps(x, int(t), *self.motion_hints.frames(frame_indices))
        except GraphCaptureError as error:
            log.warning("X-Portrait: CUDA graph recording failed (%s); sampling continues without graphs", error)
            self.enabled = False
            self.release()
            return None
        if kind == "both":
            channels = x.shape[1]
            return eps[:, :channels], eps[:, channels:]
        return eps

    def release(self) -> None:
        """Drop every graph and its memory (the run ends, or a recording failed)."""
        for graphs in self._graphs.values():
            graphs.release()
        self._graphs.clear()
