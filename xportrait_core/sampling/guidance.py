"""Classifier-free guidance as the official `controlnet_important` mode, packaged as a `denoise` callable.

    cond   = model.eps_cond(x, t, context, reference bank, global_hint, local_hint)   reference + both controls
    uncond = model.eps_uncond(x, t, uncond_context)                                   UNet + motion modules only
    eps    = uncond + scale * (cond - uncond)

The reference net depends only on the timestep (the reference latents are not noised: official `wonoise`), so its
bank is computed once per timestep, on the R references themselves (batch R), and shared by every window of that
step; the official code ran it on one copy of the reference per frame of every window.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..fast import cuda_graphs as graphs
from ..model.xportrait import XPortrait
from ..model.reference_bank import ReferenceBank

log = logging.getLogger("xportrait")

# The ControlNets' hint encoders depend on the hint alone, so their features are computed once per video and kept
# on the model's device while both together fit in this: at 512 in bf16, 5.2 MB a frame, about 100 frames. That
# saves the encoders at every window and step (3 ms each on the H100 for a 16-frame window, 4% of a step) and the
# hints' copies to the device (~5 ms a window from pageable memory). Longer videos keep their hint images in
# pinned host memory, and each window's frames are copied over and encoded as they are denoised, so device memory
# does not grow with length.
RESIDENT_HINT_FEATURE_BYTES = 512 * 2**20


def resident_hint_bytes(num_frames: int, resolution: int, dtype: torch.dtype, model_channels: int,
                        num_hints: int = 2) -> int:
    """Device bytes of a video's hint features while sampling, or 0 when they are too large and the hint images
    stay in host memory instead."""
    features = num_hints * num_frames * model_channels * (resolution // 8) ** 2 * dtype.itemsize
    return features if features <= RESIDENT_HINT_FEATURE_BYTES else 0


class GuidedDenoiser:
    """`denoise(x_window, t, frame_indices) -> eps` for `sampler.sample_ddim`.

    reference_latents: (R, 4, h, w) scaled, not noised; several references are appended in order.
    global_hint / local_hint: (F, 3, H, W) in [-1, 1] for the whole video (None skips that ControlNet). Where
        they fit (`resident_hint_bytes`), the ControlNets' hint features are computed here, once; otherwise each
        window's hint frames are moved to the model's device and encoded when it is denoised.
    context / uncond_context: (1, 77, C) text conditioning of the conditional / unconditional branch; None takes
        the model's empty-prompt context (which needs CLIP weights in the checkpoint).
    batch_branches: run both branches' UNet passes as one batch (`XPortrait.eps_branches`): faster, for the
        activation memory of a double batch; False runs them one after the other (low-VRAM mode does).
    cuda_graphs: on a CUDA device, record the reference net's and each window's work as CUDA graphs on first
        use and replay them (cuda_graphs.py); with banks precomputed (low-VRAM mode) each step's bank is copied
        into fixed device buffers instead. Falls back to eager calls, with a warning, where recording fails.
        XPORTRAIT_CUDA_GRAPHS=0 turns it off; the cudaMallocAsync allocator (ComfyUI's default) does too, with an
        info note (see cuda_graphs.py).
    """

    def __init__(self, model: XPortrait, reference_latents: torch.Tensor, *,
                 global_hint: Optional[torch.Tensor] = None, local_hint: Optional[torch.Tensor] = None,
                 guidance_scale: float = 5.0, context: Optional[torch.Tensor] = None,
                 uncond_context: Optional[torch.Tensor] = None,
                 global_strength: float = 1.0, local_strength: float = 1.0, batch_branches: bool = True,
                 cuda_graphs: bool = True):
        if reference_latents.ndim == 3:
            reference_latents = reference_latents[None]
        if reference_latents.ndim != 4 or reference_latents.shape[0] < 1:
            raise ValueError(f"reference_latents must be (R, 4, h, w), got {tuple(reference_latents.shape)}")
        for name, hint in (("global_hint", global_hint), ("local_hint", local_hint)):
            if hint is not None and hint.ndim != 4:
                raise ValueError(f"{name} must be (frames, 3, H, W), got {tuple(hint.shape)}")
        if global_hint is not None and local_hint is not None and len(global_hint) != len(local_hint):
            raise ValueError(f"global_hint has {len(global_hint)} frames but local_hint has {len(local_hint)}")
        self.model = model
        # On the model's device from the start: CUDA graphs read them in place, and a host copy cannot be recorded.
        self.reference_latents = reference_latents.to(model.device)
        self.guidance_scale = float(guidance_scale)
        self.global_strength = float(global_strength)
        self.local_strength = float(local_strength)
        # A hint whose ControlNet is off (strength 0) is never read.
        global_hint = global_hint if self.global_strength != 0 else None
        local_hint = local_hint if self.local_strength != 0 else None
        shown = [h for h in (global_hint, local_hint) if h is not None]
        self.hints_encoded = bool(shown) and resident_hint_bytes(
            len(shown[0]), shown[0].shape[-1], model.dtype, model.config.unet.model_channels, len(shown)) > 0
        if self.hints_encoded:
            # Whole-video hint features in place of the images, on the device: windows slice them like images.
            global_hint, local_hint = model.encode_motion_hints(global_hint, local_hint)
        elif model.device.type == "cuda":
            # Pinned, so each window's frames go to the GPU without stalling the host.
            global_hint, local_hint = (h.pin_memory() if h is not None and h.device.type == "cpu" else h
                                       for h in (global_hint, local_hint))
        self.global_hint, self.local_hint = global_hint, local_hint
        needs_cond = self.guidance_scale != 0.0
        needs_uncond = self.guidance_scale != 1.0
        # The reference net reads the conditional context too (official `cond_txt_void`), so it is always needed.
        placed = {"device": model.device, "dtype": model.dtype}
        self.context = (context if context is not None else model.empty_prompt_context()).to(**placed)
        self.uncond_context = None
        if needs_uncond:
            self.uncond_context = uncond_context if uncond_context is not None else model.empty_prompt_context()
            self.uncond_context = self.uncond_context.to(**placed)
            if self.uncond_context.shape == self.context.shape and torch.equal(self.uncond_context, self.context):
                # One context for both branches (the official empty prompt): the batched pass then shares it.
                self.uncond_context = self.context
        self._needs_cond = needs_cond
        self.batch_branches = bool(batch_branches)
        # Graphs record the bank a conditional branch reads: a scale of 0 (unconditional only) runs eagerly.
        self.cuda_graphs = (bool(cuda_graphs) and needs_cond and graphs.cuda_graphs_enabled()
                            and model.device.type == "cuda" and graphs.allocator_supports_graphs())
        self._graphs: Optional[graphs.GuidanceGraphs] = None
        self._bank_t: Optional[int] = None
        self._bank = None
        self._stored_banks: Optional[dict[int, ReferenceBank]] = None

    @property
    def num_frames(self) -> Optional[int]:
        hint = self.global_hint if self.global_hint is not None else self.local_hint
        return None if hint is None else len(hint)

    def reference_bank(self, t: int):
        """The bank of timestep t, computed on the first window of each step and reused by the others (or taken
        from the banks precomputed for every timestep)."""
        if self._bank_t != t:
            self._bank = None  # free the previous step's bank before building the next
            if self._stored_banks is not None:
                if t not in self._stored_banks:
                    raise KeyError(f"no precomputed reference bank for timestep {t}")
                self._bank = self._stored_banks[t].to(self.model.device)
            else:
                self._bank = self._live_bank(t)
            self._bank_t = t
        return self._bank

    def _live_bank(self, t) -> ReferenceBank:
        """The reference net's bank at timestep t (an int, or a device tensor while graphs record)."""
        return self.model.reference_bank(self.reference_latents, t, self.context)

    def precompute_reference_banks(self, timesteps, store: torch.device | str = "cpu") -> None:
        """Run the reference net now for every timestep sampling will use and keep the banks on `store`
        (pinned host memory by default: about 23 MB a timestep at 512x512, copied in once per step), so the
        reference net need not stay on the GPU while sampling (see offload.py). Same banks, same result.

        With CUDA graphs on, the reference net is recorded after its first timestep and replayed for the others:
        eagerly, launching a batch-1 pass kept the GPU waiting on the host (0.9 s for 31 timesteps, H200). The
        copies out are asynchronous, with one synchronisation at the end."""
        if self._graphs is not None:  # graphs recorded so far read the live banks
            self._graphs.release()
            self._graphs = None
        timesteps = [int(t) for t in torch.as_tensor(timesteps).tolist()]
        try:
            banks = self._computed_banks(timesteps, store, use_graphs=self.cuda_graphs)
        except graphs.GraphCaptureError as error:
            log.warning("X-Portrait: CUDA graph recording failed (%s); reference banks computed without graphs",
                        error)
            banks = self._computed_banks(timesteps, store, use_graphs=False)
        self._stored_banks = banks
        self._bank = self._bank_t = None

    def _computed_banks(self, timesteps: list[int], store, use_graphs: bool) -> dict[int, ReferenceBank]:
        device = self.model.device
        source = graphs.GuidanceGraphs(device, self._guided_eps, compute_bank=self._live_bank) if use_graphs else None
        bank_of = source.reference_bank if source is not None else self._live_bank
        banks = {}
        try:
            for t in timesteps:
                banks[t] = bank_of(t).to(store, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # the copies to the host have landed
        finally:
            if source is not None:
                source.release()
        return banks

    def release(self) -> None:
        """Drop the cached reference banks and CUDA graphs (call when sampling ends or is cancelled)."""
        if self._graphs is not None:
            self._graphs.release()
            self._graphs = None
        self._bank = None
        self._bank_t = None
        self._stored_banks = None

    @staticmethod
    def _frames(hint: Optional[torch.Tensor], frame_indices: torch.Tensor) -> Optional[torch.Tensor]:
        if hint is None:
            return None
        # Windows are runs of consecutive frames, wrapping round the end of the video: slice them, so a
        # device-resident hint needs no index tensor copied to the device (a stream sync from pageable memory).
        first, count, total = int(frame_indices[0]), len(frame_indices), len(hint)
        if count <= total and torch.equal(frame_indices, (torch.arange(count) + first) % total):
            end = first + count
            return hint[first:end] if end <= total else torch.cat([hint[first:], hint[: end - total]])
        return hint.index_select(0, frame_indices.to(hint.device))

    def _guided_eps(self, x: torch.Tensor, t, global_hint: Optional[torch.Tensor],
                    local_hint: Optional[torch.Tensor], bank: Optional[ReferenceBank]) -> torch.Tensor:
        """The guided eps of one window (t an int, or a device tensor while graphs record): both branches in one
        UNet batch, or one after the other (`batch_branches=False`), or the one branch a scale of 0 or 1 needs."""
        common = dict(global_hint=global_hint, local_hint=local_hint, global_strength=self.global_strength,
                      local_strength=self.local_strength, hints_encoded=self.hints_encoded)
        if self._needs_cond and self.uncond_context is not None and self.batch_branches:
            cond, uncond = self.model.eps_branches(x, t, self.context, self.uncond_context, bank, **common)
            return uncond + self.guidance_scale * (cond - uncond)
        uncond = None
        if self.uncond_context is not None:
            uncond = self.model.eps_uncond(x, t, self.uncond_context).float()
            if not self._needs_cond:
                return uncond
        cond = self.model.eps_cond(x, t, self.context, bank, **common).float()
        if uncond is None:
            return cond
        return uncond + self.guidance_scale * (cond - uncond)

    def _graphed_eps(self, x: torch.Tensor, t: int, frame_indices: torch.Tensor) -> Optional[torch.Tensor]:
        """The guided eps through CUDA graphs, or None where they are off or could not be recorded."""
        if not self.cuda_graphs:
            return None
        if self._graphs is None:
            source = ({"stored_banks": self._stored_banks} if self._stored_banks is not None
                      else {"compute_bank": self._live_bank})
            self._graphs = graphs.GuidanceGraphs(self.model.device, self._guided_eps, **source)
        try:
            return self._graphs.eps(x, t, self._frames(self.global_hint, frame_indices),
                                    self._frames(self.local_hint, frame_indices))
        except graphs.GraphCaptureError as error:
            log.warning("X-Portrait: CUDA graph recording failed (%s); sampling continues without graphs", error)
            self.cuda_graphs = False
            self._graphs.release()
            self._graphs = None
            return None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: int, frame_indices: torch.Tensor) -> torch.Tensor:
        eps = self._graphed_eps(x, t, frame_indices)
        if eps is not None:
            return eps
        # A scale of 0 reads the unconditional branch alone, which needs no bank.
        bank = self.reference_bank(t) if self._needs_cond else None
        return self._guided_eps(x, t, self._frames(self.global_hint, frame_indices),
                                self._frames(self.local_hint, frame_indices), bank)


def guided_denoiser(model: XPortrait, reference_latents: torch.Tensor, **kwargs) -> GuidedDenoiser:
    """Build the official `controlnet_important` denoiser; keyword arguments as `GuidedDenoiser`."""
    return GuidedDenoiser(model, reference_latents, **kwargs)
