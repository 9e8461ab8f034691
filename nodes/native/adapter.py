"""X-Portrait as a ComfyUI model: a `BaseModel` whose `diffusion_model` is our UNet, so KSampler, SamplerCustom(Advanced),
ComfyUI's samplers and schedulers, LoRA loaders and its memory manager work on it.

- Key names: our UNet already carries the LDM names (input_blocks.*, middle_block.*, output_blocks.*, time_embed.*,
  out.*; the motion modules add input_motion_modules.* / output_motion_modules.*), and the model config is SD1.5's
  with the UNet's layout filled in, so `comfy.lora.model_lora_keys_unet` maps kohya / diffusers / generic SD1.5 LoRA
  keys onto it. LoRA patches only `diffusion_model` (the denoising UNet, as the official LCM path patches); the
  reference net and the ControlNets are extra submodules that ComfyUI loads and offloads but no UNet LoRA touches.
- Conditioning: "X-Portrait Conditioning" puts one `XPortraitBranch` in each CONDITIONING's options (key
  "xportrait"): conditional on the positive (reference bank + ControlNets, the official `controlnet_important` mode),
  unconditional on the negative (UNet + motion modules). `extra_conds` turns it into a model cond that ComfyUI can
  batch (cond and uncond of one job together), and `_apply_model` hands the chunks to the core's `VideoDenoiser`,
  which cuts the latent batch (= the frames) into 16-frame windows with seeded offsets, or runs the window a core
  context-window node cut.
- Sampling state (window-offset generator, reference banks, encoded hints) lives for one sampling run: an
  OUTER_SAMPLE wrapper starts it with the sampler's seed and sigmas and ends it. The sigmas' timesteps let the
  reference banks of up to 16 steps come from one reference-net call (sampling/batched_banks.py). A short run
  hands its banks and encoded hints to the next run of the same conditioning, which takes them where its texts,
  schedule and weights are the same (a re-queue with another seed: sampling/carried_branches.py).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import torch

import comfy.conds
import comfy.model_base
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.supported_models

from xportrait_core.fast.kept_graphs import KeptWindowGraphs
from xportrait_core.sampling.carried_branches import CarriedBranches
from xportrait_core.sampling.video_denoiser import BranchInput, VideoDenoiser

log = logging.getLogger("xportrait")

WRAPPER_KEY = "xportrait"
COND_KEY = "xportrait"


def sd15_unet_config(unet) -> dict:
    """SD1.5's unet_config for our UNet's layout: what ComfyUI's diffusers key map (`unet_to_diffusers`) reads."""
    levels = len(unet.channel_mult)
    depth = [unet.transformer_depth if 2 ** level in unet.attention_resolutions else 0 for level in range(levels)]
    return {
        "context_dim": unet.context_dim,
        "model_channels": unet.model_channels,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "num_res_blocks": [unet.num_res_blocks] * levels,
        "channel_mult": list(unet.channel_mult),
        "attention_resolutions": list(unet.attention_resolutions),
        "transformer_depth": [d for d in depth for _ in range(unet.num_res_blocks)],
        "transformer_depth_output": [d for d in depth for _ in range(unet.num_res_blocks + 1)],
        "transformer_depth_middle": unet.transformer_depth,
        "num_heads": unet.num_heads,
        "num_head_channels": -1,
        # The network exists already (ours): BaseModel must not build ComfyUI's own UNet.
        "disable_unet_model_creation": True,
    }


class XPortraitModelSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """SD1.5's discrete EPS sampling (the same scaled-linear schedule X-Portrait was trained with), with the official
    start at full denoise.

    The official x_T is the reference latent z noised to the last timestep: sqrt(a_999) z + sqrt(1 - a_999) n.
    ComfyUI's samplers work on x = latent + sigma * n and show the network x / sqrt(1 + sigma^2) = sqrt(a) x; at
    sigma_max = sigma(999) that is sqrt(a_999) z + sqrt(a_999) sigma_max n = sqrt(a_999) z + sqrt(1 - a_999) n:
    exactly the official x_T when the LATENT is z and the noise is scaled by sigma_max. ComfyUI instead scales the
    noise by sqrt(1 + sigma_max^2) when sampling starts at sigma_max (meant for empty latents: the model then sees
    unit-variance noise), which would weaken the reference by 0.2%: here the noise is always scaled by sigma, also
    for empty latents, where it is the DDPM forward process at t=999 (variance 1 - a_999 rather than 1).
    A schedule that starts below sigma_max (ddim_uniform, whose first sigma is that of the official first timestep,
    e.g. 991 at 30 steps; or denoise < 1) noises the latent to its own first sigma, as for any ComfyUI model; the
    official code noises to 999 and then denoises from 991 as if the latents were at 991.
    """

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return super().noise_scaling(sigma, noise, latent_image, max_denoise=False)


@dataclass(eq=False)
class XPortraitJob:
    """One video's X-Portrait conditioning (from "X-Portrait Conditioning"), shared by its two branches.

    reference_latents: (R, 4, h, w) scaled, not noised (the bank's input). global_hint / local_hint: (F, 3, H, W) in
    [-1, 1] on the CPU. seed: window offsets when the sampler gives no seed.
    """

    reference_latents: torch.Tensor
    global_hint: Optional[torch.Tensor]
    local_hint: Optional[torch.Tensor]
    global_strength: float = 1.0
    local_strength: float = 1.0
    window: int = 16
    overlap: int = 4
    seed: int = 0

    @property
    def num_frames(self) -> int:
        hint = self.global_hint if self.global_hint is not None else self.local_hint
        return len(hint)


@dataclass(frozen=True, eq=False)
class XPortraitBranch:
    """One branch of a job. As made by X-Portrait Conditioning it holds the job and its kind; the model's
    `extra_conds` adds, for one sampling run, the branch's text on the sampling device (`context`: the same tensor
    at every call, so the denoiser knows it by identity, without comparing values on the GPU) and whether ComfyUI
    hands it the whole latent frames (`whole_frame`: no area set on the conditioning, so both branches of a batch
    are cut from the same latents)."""

    job: XPortraitJob
    conditional: bool
    context: Optional[torch.Tensor] = None
    whole_frame: bool = True


class XPortraitCond(comfy.conds.CONDConstant):
    """The model cond of one branch: not a tensor, not resized; the branches of one job batch together, so the
    conditional and unconditional passes can share one UNet batch per window."""

    def process_cond(self, batch_size, **kwargs):
        return self

    def can_concat(self, other):
        return isinstance(other, XPortraitCond) and other.cond.job is self.cond.job

    def concat(self, others):
        return [self.cond] + [other.cond for other in others]

    def size(self):
        return [1]


class XPortraitComfyModel(comfy.model_base.BaseModel):
    """ComfyUI's BaseModel over an `XPortrait`: `diffusion_model` is its UNet; the reference net and the two
    ControlNets are submodules too (ComfyUI places them with the UNet). The VAE and the text encoder are not: they
    travel as ComfyUI's own VAE and CLIP."""

    def __init__(self, xportrait, device=None):
        model_config = comfy.supported_models.SD15(sd15_unet_config(xportrait.config.unet))
        super().__init__(model_config, model_type=comfy.model_base.ModelType.EPS, device=device)
        self.model_sampling = XPortraitModelSampling(model_config)
        # Weights stored in fp8: ComfyUI's own name for the dtype the networks compute in (its fp8 UNets' too).
        self.manual_cast_dtype = xportrait.dtype if xportrait.storage_dtype != xportrait.dtype else None
        self.diffusion_model = xportrait.unet
        self.reference_net = xportrait.reference_net
        self.global_control = xportrait.global_control
        self.local_control = xportrait.local_control
        # Not a submodule (its VAE and text encoder are not ComfyUI's to place); its methods run the networks above.
        self.__dict__["xportrait"] = xportrait
        self.memory_usage_factor = 1.0
        self._denoisers: dict[int, tuple[XPortraitJob, VideoDenoiser]] = {}
        # KSampler's window graphs, kept from run to run while runs fit them (fast/kept_graphs.py); dropped when
        # ComfyUI moves the model off the device (model_patcher's detach callback) or graphs stop applying.
        self.kept_graphs = KeptWindowGraphs()
        self._run_seed: Optional[int] = None
        self._run_timesteps: Optional[list[int]] = None
        # The last run's branches of a job, for the next run of that job (sampling/carried_branches.py).
        self._carried: Optional[tuple[XPortraitJob, CarriedBranches]] = None
        self._warned_control = False

    def get_dtype(self):
        # The weights' dtype (fp8 where stored so), as ComfyUI's models answer: its memory estimates and LoRA
        # patching (weights upcast, patched, rounded back to this dtype) read it; activations are manual_cast_dtype.
        return self.xportrait.storage_dtype

    # ---- conditioning ---------------------------------------------------------------------------------------

    def extra_conds(self, **kwargs):
        branch = kwargs.get(COND_KEY)
        device, cross_attn = kwargs.get("device"), kwargs.get("cross_attn")
        if branch is not None and cross_attn is not None and device is not None:
            # The text on the sampling device once per run: ComfyUI repeats and joins it at every call, which
            # on a host tensor means a copy to the GPU that waits for the GPU to drain, twice a step.
            kwargs["cross_attn"] = cross_attn = cross_attn.to(device)
        out = super().extra_conds(**kwargs)
        if branch is not None:
            out[COND_KEY] = XPortraitCond(dataclasses.replace(branch, context=cross_attn,
                                                              whole_frame=kwargs.get("area") is None))
        return out

    def memory_required(self, input_shape, cond_shapes={}):
        from xportrait_core.fast.offload import sampling_working_memory

        frames, height = int(input_shape[0]), int(input_shape[2])
        window = min(16, frames)
        # Each window call holds at most two branches' activations; the whole batch's latents are small.
        return sampling_working_memory(height * 8, window, self.xportrait.dtype, 0,
                                       self.xportrait.config.unet.model_channels)

    # ---- sampling run ---------------------------------------------------------------------------------------

    def start_run(self, seed: Optional[int], sigmas: Optional[torch.Tensor] = None) -> None:
        """A sampling run begins: its seed (window offsets) and its sigmas, whose timesteps let the reference
        banks of several steps come from one reference-net call."""
        self.end_run()
        self._run_seed = None if seed is None else int(seed)
        if sigmas is not None:
            self._run_timesteps = [self.timestep_of(sigma) for sigma in sigmas.reshape(-1) if float(sigma) > 0]

    def timestep_of(self, sigma: torch.Tensor) -> int:
        """The network's timestep of a sigma: the nearest of the 1000 discrete ones (ComfyUI's timestep())."""
        return int(self.model_sampling.timestep(sigma.reshape(1)).reshape(-1)[0])

    def _graphs_apply(self, device: torch.device) -> bool:
        """Whether this run's windows can replay from CUDA graphs: graphs apply on the device (fast/cuda_graphs.py)
        and no layer casts or patches its weights as it runs (partial loading, LoRA applied on the fly: host copies
        inside the call, which a recording cannot hold). Whether the run is long enough to record them is the kept
        graphs' decision (fast/kept_graphs.py): a short run that repeats the previous one records too."""
        from xportrait_core.fast import compilation, cuda_graphs

        from .operations import casts_weights_now

        xportrait = self.xportrait
        if not cuda_graphs.graphs_apply(device, compiled=compilation.is_compiled(xportrait)):
            return False
        return not any(casts_weights_now(layer) for layer in self._comfy_layers())

    def _comfy_layers(self) -> tuple:
        """The layers of the four sampling networks that ComfyUI can make cast or patch their weights (its
        `comfy.ops` classes), collected once: walking all the modules at every run costs milliseconds."""
        layers = self.__dict__.get("_comfy_layer_list")
        if layers is None:
            xportrait = self.xportrait
            networks = (xportrait.unet, xportrait.reference_net, xportrait.global_control, xportrait.local_control)
            layers = tuple(layer for network in networks for layer in network.modules()
                           if hasattr(layer, "comfy_cast_weights"))
            self.__dict__["_comfy_layer_list"] = layers
        return layers

    def end_run(self, carry: bool = True) -> None:
        """A sampling run ends: its denoisers' state goes, except the branches one of them hands to the next run
        of its job (`carry`: the run ended well)."""
        for job, denoiser in self._denoisers.values():
            if not carry:
                denoiser.release()
                continue
            handed = denoiser.carry()
            if handed is not None:
                self.release_carried()
                self._carried = (job, handed)
        self._denoisers = {}
        self._run_seed = None
        self._run_timesteps = None

    def release_carried(self) -> None:
        """Drop the branches kept for the next run (ComfyUI unloads the model, or a run failed)."""
        if self._carried is not None:
            self._carried[1].release()
            self._carried = None

    def _denoiser(self, job: XPortraitJob, device: torch.device) -> VideoDenoiser:
        """This run's denoiser of a job (made on its first call): its offsets seeded by the sampler's seed, its
        windows replayed from CUDA graphs where they apply on `device` (the sampling device)."""
        entry = self._denoisers.get(id(job))
        if entry is None or entry[0] is not job:
            seed = job.seed if self._run_seed is None else self._run_seed
            # Where graphs do not apply, the denoiser has the kept graphs released.
            graphs = self._graphs_apply(device)
            carried = None
            if self._carried is not None:
                if self._carried[0] is job:  # the denoiser takes them, or releases them where they do not fit
                    carried = self._carried[1]
                    self._carried = None
                else:
                    self.release_carried()
            denoiser = VideoDenoiser(self.xportrait, job.reference_latents,
                                     global_hint=job.global_hint, local_hint=job.local_hint,
                                     global_strength=job.global_strength, local_strength=job.local_strength,
                                     window=job.window, overlap=job.overlap, seed=seed,
                                     timesteps=self._run_timesteps, cuda_graphs=graphs,
                                     kept_graphs=self.kept_graphs, carried=carried)
            entry = self._denoisers[id(job)] = (job, denoiser)
        return entry[1]

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        branches = kwargs.get(COND_KEY)
        if branches is None:
            raise ValueError("X-Portrait: this conditioning did not pass through X-Portrait Conditioning: connect both "
                             "the positive and the negative of the sampler to its outputs")
        if not isinstance(branches, list):
            branches = [branches]
        if control is not None and not self._warned_control:
            log.warning("X-Portrait: an SD1.5 ControlNet on the conditioning is ignored; X-Portrait's own "
                        "ControlNets read the motion of X-Portrait Conditioning")
            self._warned_control = True
        jobs = {id(b.job) for b in branches}
        if len(jobs) != 1:
            raise ValueError("X-Portrait: the positive and negative come from different X-Portrait Conditioning nodes")
        chunks = len(branches)
        frames = x.shape[0] // chunks
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x).float()
        timestep = self.timestep_of(sigma[:1])
        denoiser = self._denoiser(branches[0].job, x.device)
        inputs = []
        for i, branch in enumerate(branches):
            context = branch.context if branch.context is not None else c_crossattn[i * frames:i * frames + 1]
            inputs.append(BranchInput(xc[i * frames:(i + 1) * frames], branch.conditional, context))
        window = transformer_options.get("context_window")
        frame_indices = list(window.index_list) if window is not None else None
        # ComfyUI cuts every chunk of a batch from the same latents unless a conditioning sets an area: then the
        # two guidance branches share one UNet batch without their latents being compared on the GPU.
        same_latents = True if all(b.whole_frame for b in branches) else None
        # Under partial loading some layers' weights stay in system memory: the inputs' device is the compute one.
        self.xportrait.compute_device = x.device
        try:
            eps = torch.cat(denoiser(timestep, inputs, frame_indices=frame_indices, same_latents=same_latents))
        finally:
            self.xportrait.compute_device = None
        return self.model_sampling.calculate_denoised(sigma, eps, x)


def _outer_sample(executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                  disable_pbar=False, seed=None, *args, **kwargs):
    """One sampling run: window offsets seeded by the sampler's seed; cached banks and hints dropped at the end."""
    model = executor.class_obj.model_patcher.model
    unload_patched(model.xportrait.unet, keep_model=model)
    model.start_run(seed, sigmas)
    try:
        return executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                        *args, **kwargs)
    except BaseException:
        # A run that failed or was cancelled leaves no graphs behind, and hands nothing to the next run.
        model.kept_graphs.release()
        model.end_run(carry=False)
        model.release_carried()
        raise
    finally:
        model.end_run()


def model_patcher(xportrait, load_device, offload_device) -> comfy.model_patcher.ModelPatcher:
    """The MODEL output of X-Portrait Load Model."""
    model = XPortraitComfyModel(xportrait, device=offload_device)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample)
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, WRAPPER_KEY, _on_detach)
    return patcher


def _on_detach(patcher, unpatch_all: bool) -> None:
    """ComfyUI unloads the model (`unpatch_all`: its weights go back to the offload device): the kept graphs'
    addresses are stale and their memory is wanted, as is the carried branches' (banks and hint features).
    ComfyUI also detaches a loaded model with unpatch_all False each time a sampler loads it again
    (model_management.load_models_gpu pops and re-loads every model it finds loaded, itself included): its weights
    stay where they are, and so do the kept graphs; a clone loaded with other weight patches (a LoRA) replaces
    weight tensors, which the kept graphs' signature sees."""
    if unpatch_all:
        patcher.model.kept_graphs.release()
        patcher.model.release_carried()


def unload_patched(unet, keep_model) -> None:
    """Unload every ComfyUI model other than `keep_model` that holds patched weights (a LoRA) of this UNet,
    restoring its plain weights: the MODEL output, our own Sampler and any other handle share the networks, and
    ComfyUI takes off a LoRA only when it loads another copy of the same model object. Copies of `keep_model`
    itself are ComfyUI's to re-patch as it loads them."""
    import comfy.model_management as mm

    for loaded in list(mm.current_loaded_models):
        patcher = loaded.model
        if patcher is None or patcher.model is keep_model or not patcher.patches:
            continue
        if any(module is unet for module in patcher.model.modules()):
            loaded.model_unload()
            mm.current_loaded_models.remove(loaded)
