"""X-Portrait as a plain noise predictor over a whole video, for samplers that are not ours (ComfyUI's KSampler).

A host's sampler asks for eps of every frame at one timestep, for one or both official branches, and applies
guidance itself. This puts together the pieces our own Sampler runs on, so the math lives in one place:
`branches.XPortraitBranches` (conditional: reference bank + both ControlNets; unconditional: UNet + motion
modules; both in one UNet batch; the bank cached per timestep, the hint features encoded once) and
`windows.windowed_eps` over `windows.window_indices` (16-frame windows overlapping by `overlap`, eps averaged per
frame). One window start offset is drawn per timestep from a CPU generator seeded by the caller, as `sample_ddim`
draws it, so the same seed gives the same offsets as our Sampler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..fast.compilation import is_compiled
from ..fast.cuda_graphs import WindowGraphs, repays_recording
from ..model.xportrait import XPortrait
from .batched_banks import BatchedReferenceBanks
from .branches import XPortraitBranches
from .carried_branches import CarriedBranches, carries
from .windows import effective_window, window_indices, windowed_eps


@dataclass(frozen=True)
class BranchInput:
    """One branch's request: latents x_t (F, 4, h, w) of the whole video and its text context (1, tokens, C)."""

    latents: torch.Tensor
    conditional: bool
    context: torch.Tensor


def _same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return a is b or (a is not None and b is not None and a.shape == b.shape
                      and torch.equal(a.to(b.device, b.dtype), b))


class VideoDenoiser:
    """eps of every frame for the requested branches at one timestep; see the module docstring.

    reference_latents: (R, 4, h, w) scaled, not noised. global_hint / local_hint: (F, 3, H, W) in [-1, 1]
    (None, or a strength of 0, skips that ControlNet). seed: the window offsets' generator.
    timesteps: the run's timesteps in the order the sampler will ask for them, when the host knows them (ComfyUI's
    sigmas): their reference banks are then computed several at a time (`BatchedReferenceBanks`), also as the
    source graphs copy each step's bank from (except for a compiled model with graphs, which records the
    reference net per timestep); other timesteps, or None, compute one bank per timestep.
    cuda_graphs: CUDA graphs can replay the windows' work (`fast.cuda_graphs.WindowGraphs`; the caller checks
    that they apply on the device: `cuda_graphs.graphs_apply`, no layer casting its weights as it runs); the run's
    length then decides (`cuda_graphs.repays_recording` of len(timesteps), or kept_graphs' rule).
    kept_graphs: a `fast.kept_graphs.KeptWindowGraphs` that serves the graphs, owned by the caller and outliving
        this denoiser, so that the next run like this one replays from its first window; with cuda_graphs False
        it is told so (and drops its graphs).
    carried: the last run's branches of the same job (`carry()`), taken where they fit this run
        (carried_branches.py: the same texts, timesteps and weights), released otherwise.
    """

    def __init__(self, model: XPortrait, reference_latents: torch.Tensor, *,
                 global_hint: Optional[torch.Tensor] = None, local_hint: Optional[torch.Tensor] = None,
                 global_strength: float = 1.0, local_strength: float = 1.0, window: int = 16, overlap: int = 4,
                 seed: int = 0, timesteps: Optional[Sequence[int]] = None, cuda_graphs: bool = False,
                 kept_graphs=None, carried: Optional[CarriedBranches] = None):
        if reference_latents.ndim != 4:
            raise ValueError(f"reference_latents must be (R, 4, h, w), got {tuple(reference_latents.shape)}")
        self.model = model
        self.reference_latents = reference_latents
        self.hints = dict(global_hint=global_hint, local_hint=local_hint, global_strength=float(global_strength),
                          local_strength=float(local_strength))
        hint = global_hint if global_hint is not None else local_hint
        self.num_frames = None if hint is None else len(hint)
        self.window = int(window)
        self.overlap = int(overlap)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.timesteps = [int(t) for t in timesteps] if timesteps else None
        self._offset_t = None
        self._offset = 0
        self._branches: Optional[XPortraitBranches] = None
        self._contexts: tuple = (None, None)
        self.cuda_graphs = bool(cuda_graphs)
        self.kept_graphs = kept_graphs
        self._graphs: Optional[WindowGraphs] = None
        self._carried = carried
        self.took_carried = False  # whether this run's branches were the last run's

    def carry(self) -> Optional[CarriedBranches]:
        """End this run handing its branches to the next run of the same job (`carried=`), where the run is short
        enough to carry them (`carried_branches.carries`); otherwise (or with no branches made) release as
        `release` does and give None."""
        branches = self._branches
        if branches is None or not carries(self.timesteps):
            self.release()
            return None
        self._branches = None
        self.release()
        return CarriedBranches(branches, self.timesteps)

    def release(self) -> None:
        """Drop the cached bank and hint features (the end of a sampling run); kept graphs stay with their owner."""
        if self._graphs is not None and self.kept_graphs is None:
            self._graphs.release()
        self._graphs = None
        if self._branches is not None:
            self._branches.release()
        self._branches = None
        self._contexts = (None, None)
        if self._carried is not None:
            self._carried.release()
            self._carried = None

    def window_offset(self, t, num_frames: int) -> int:
        """The start offset of timestep t's windows: drawn when t differs from the previous call's timestep (the
        conditional and unconditional calls of one step share it)."""
        if self._offset_t != t:
            _, draws = effective_window(num_frames, self.window, self.overlap)
            self._offset = int(torch.randint(0, num_frames, (1,), generator=self.generator).item()) if draws else 0
            self._offset_t = t
        return self._offset

    def _branches_for(self, context: torch.Tensor, uncond_context: Optional[torch.Tensor]) -> XPortraitBranches:
        """The branches for these texts, made on first use (on the model's device, where the hint features are
        encoded) and kept while the texts stay the same."""
        cached_context, cached_uncond = self._contexts
        if (self._branches is None or not _same(context, cached_context)
                or (uncond_context is not None and not _same(uncond_context, cached_uncond))):
            carried, self._carried = self._carried, None
            self.release()
            # Several timesteps' banks per reference-net call. Without graphs that saves launches; with them the
            # banks are the graphs' stored source, computed outside the recordings (and a re-queued short run
            # takes them all from the last run). Compiled blocks keep the recorded batch-1 pass (batched rows
            # would compile the reference net for another shape; computing them with the blocks run eagerly
            # did not pay enough: benchmarks/NOTES.md, session 24).
            batched = bool(self.timesteps) and not (self.cuda_graphs and is_compiled(self.model))
            if carried is not None and carried.fits(self.model, self.timesteps, batched, context, uncond_context):
                self._branches = carried.branches
                self.took_carried = True
            else:
                if carried is not None:
                    carried.release()
                self._branches = XPortraitBranches(self.model, self.reference_latents, context=context,
                                                   uncond_context=uncond_context, **self.hints)
                if batched:
                    self._branches.banks = BatchedReferenceBanks(self._branches.banks, self.timesteps)
            steps = len(self.timesteps) if self.timesteps else None
            if self.kept_graphs is not None:
                self._graphs = self.kept_graphs.serve(self._branches, steps, graphs_apply=self.cuda_graphs)
            elif self.cuda_graphs and repays_recording(steps):
                self._graphs = WindowGraphs(self._branches)
            self._contexts = (context, uncond_context)
        return self._branches

    @torch.no_grad()
    def __call__(self, t, branches: Sequence[BranchInput], frame_indices: Optional[Sequence[int]] = None,
                 same_latents: Optional[bool] = None) -> list[torch.Tensor]:
        """eps (float32, on each branch's latents' device) per branch, in order.

        frame_indices: the latents are already one window, of these frames of the video (a host that cuts the
        windows itself, e.g. ComfyUI's context-window nodes): that window runs as it is, with its frames' hints.
        same_latents: the host knows that the branches hold the same latents (True), so a conditional and an
        unconditional one share a UNet batch; None compares them, which waits for the GPU.
        """
        if not branches:
            return []
        num_frames = branches[0].latents.shape[0]
        if any(b.latents.shape != branches[0].latents.shape for b in branches):
            raise ValueError("every branch must hold the same video: got latents of shapes "
                             f"{[tuple(b.latents.shape) for b in branches]}")
        if frame_indices is not None:
            frame_indices = torch.as_tensor(list(frame_indices), dtype=torch.int64)
            if len(frame_indices) != num_frames:
                raise ValueError(f"{len(frame_indices)} frame indices for a window of {num_frames} latents")
            if self.num_frames is not None and (frame_indices.min() < 0 or frame_indices.max() >= self.num_frames):
                raise ValueError(f"window frames {frame_indices.tolist()} outside the motion's {self.num_frames}")
        elif self.num_frames is not None and self.num_frames != num_frames:
            raise ValueError(f"the latents hold {num_frames} frames but the motion has {self.num_frames}: give the "
                             "sampler one latent per driving frame")
        window = num_frames if frame_indices is not None else min(self.window, num_frames)
        if window > self.model.config.motion.max_frames:
            raise ValueError(f"a window of {window} frames is longer than the motion modules' "
                             f"{self.model.config.motion.max_frames}")
        conditional = [b for b in branches if b.conditional]
        unconditional = [b for b in branches if not b.conditional]
        # The reference net reads the conditional text; with no conditional branch asked for, no bank is made.
        context = (conditional or unconditional)[0].context
        parts = self._branches_for(context, unconditional[0].context if unconditional else None)

        graphs = self._graphs

        def single(branch: BranchInput):
            if not branch.conditional:
                return parts.uncond
            if graphs is None:
                return parts.cond

            def cond(x, t_, indices):
                eps = graphs("cond", x, t_, indices)
                return eps if eps is not None else parts.cond(x, t_, indices)
            return cond

        def pair(x, t_, indices):
            eps = graphs("both", x, t_, indices) if graphs is not None else None
            return eps if eps is not None else parts.both(x, t_, indices)

        # Both branches on the same latents (classifier-free guidance): one UNet batch per window. (`parts` reads
        # the conditional branch's text by construction.)
        paired = (len(branches) == 2 and len(conditional) == 1
                  and (same_latents or (same_latents is None
                                        and torch.equal(branches[0].latents, branches[1].latents))))
        if frame_indices is not None:  # one window, cut by the host
            if paired:
                both = pair(conditional[0].latents, t, frame_indices)
                by_kind = {True: both[0], False: both[1]}
                return [by_kind[b.conditional].float() for b in branches]
            return [single(b)(b.latents, t, frame_indices).float() for b in branches]
        windows = window_indices(num_frames, self.window, self.overlap, self.window_offset(t, num_frames))
        if paired:
            # windowed_eps averages one tensor: the two branches travel side by side on the channel axis.
            channels = conditional[0].latents.shape[1]

            def both(x2, t_, indices):
                return torch.cat(pair(x2[:, :channels], t_, indices), dim=1)

            x = conditional[0].latents
            eps = windowed_eps(both, torch.cat([x, x], dim=1), t, windows)
            by_kind = {True: eps[:, :channels], False: eps[:, channels:]}
            return [by_kind[b.conditional] for b in branches]
        return [windowed_eps(single(b), b.latents, t, windows) for b in branches]
