"""Reading X-Portrait checkpoints: the one place where the official key names are mapped onto ours.

Accepted files: the released `model_state-415001.th` and any `.th` / `.ckpt` / `.pt` torch file (read with
`torch.load(weights_only=True)`, never unpickling code; a `state_dict` wrapper is unwrapped), and `.safetensors`,
in the official key format or ours (as written by `convert_checkpoint`).

Loading builds the model on the meta device, checks every key and shape, and refuses a checkpoint that does not
fit, naming the missing, unexpected and mis-shaped keys. CLIP text-encoder keys (`cond_stage_model.*`) are kept
for the text encoder when they are CLIP ViT-L/14's; the DDPM schedule buffers are checked against ours.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from .config import XPortraitConfig
from .operations import Operations
from .schedule import make_alphas_cumprod

log = logging.getLogger("xportrait")

CHECKPOINT_SUFFIXES = (".th", ".ckpt", ".pt", ".pth", ".safetensors")
FORMAT_TAG = "xportrait-core"

# Official prefix -> ours, most specific first. Only prefixes differ: inside each network the layout (and so every
# remaining key segment) is the official one.
_PREFIX_MAP = (
    (re.compile(r"^model\.diffusion_model\.input_blocks_motion_module\.(\d+)\.0\.temporal_transformer\."),
     r"unet.input_motion_modules.\1."),
    (re.compile(r"^model\.diffusion_model\.output_blocks_motion_module\.(\d+)\.0\.temporal_transformer\."),
     r"unet.output_motion_modules.\1."),
    (re.compile(r"^model\.diffusion_model\."), "unet."),
    (re.compile(r"^appearance_control_model\."), "reference_net."),
    (re.compile(r"^pose_control_model\."), "global_control."),
    (re.compile(r"^local_pose_control_model\."), "local_control."),
    (re.compile(r"^first_stage_model\."), "vae."),
    (re.compile(r"^cond_stage_model\.transformer\.text_model\."), "text_encoder."),
    (re.compile(r"^cond_stage_model\.transformer\.(?=embeddings\.|encoder\.|final_layer_norm\.)"), "text_encoder."),
)

# Official keys that carry nothing our model needs.
_IGNORED = (
    # The reference net is built from the ControlNet class and carries a hint encoder it never runs.
    re.compile(r"^appearance_control_model\.input_hint_block\."),
    # HF's position-id buffer: always arange(77).
    re.compile(r"^cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids$"),
    # The DDPM schedule buffers (checked separately against ours) and the training-only logvar.
    re.compile(r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
               r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|"
               r"posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|"
               r"logvar|model_ema\..*)$"),
)

_OUR_PREFIXES = ("unet.", "reference_net.", "global_control.", "local_control.", "vae.", "text_encoder.")


class CheckpointError(ValueError):
    """The file is not an X-Portrait checkpoint this model can load; the message says why, naming keys."""


@dataclass
class KeyReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 12) -> str:
        parts = []
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("wrong shape", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
                parts.append(f"{len(keys)} {name}: {shown}")
        return "; ".join(parts) or "all keys fit"


def official_to_ours(key: str) -> Optional[str]:
    """Our name for an official checkpoint key; None for keys the model does not use (schedule, unused hint block)."""
    if any(p.match(key) for p in _IGNORED):
        return None
    for pattern, replacement in _PREFIX_MAP:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return key  # unknown: reported as unexpected by the caller


def ours_to_official(key: str) -> str:
    """Inverse of `official_to_ours` for the keys our model has (used to write official-format files)."""
    for ours, official in (
        (r"^unet\.input_motion_modules\.(\d+)\.", r"model.diffusion_model.input_blocks_motion_module.\1.0.temporal_transformer."),
        (r"^unet\.output_motion_modules\.(\d+)\.", r"model.diffusion_model.output_blocks_motion_module.\1.0.temporal_transformer."),
        (r"^unet\.", "model.diffusion_model."),
        (r"^reference_net\.", "appearance_control_model."),
        (r"^global_control\.", "pose_control_model."),
        (r"^local_control\.", "local_pose_control_model."),
        (r"^vae\.", "first_stage_model."),
        (r"^text_encoder\.", "cond_stage_model.transformer.text_model."),
    ):
        if re.match(ours, key):
            return re.sub(ours, official, key, count=1)
    raise KeyError(key)


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, on CPU, without executing any code from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"{path.name}: not a checkpoint file (expected one of {', '.join(CHECKPOINT_SUFFIXES)})")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path.name}: not a readable safetensors file ({exc})") from exc
    try:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:
        raise CheckpointError(
            f"{path.name}: cannot be read as a weights-only torch checkpoint ({type(exc).__name__}: {exc}). "
            "Files that need arbitrary code to unpickle are refused."
        ) from exc
    while isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path.name}: does not hold a state dict of tensors")
    return data


def to_our_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename official keys to ours (ours pass through). Returns (renamed, ignored official keys)."""
    renamed, ignored = {}, []
    for key, value in state_dict.items():
        ours = key if key.startswith(_OUR_PREFIXES) else official_to_ours(key)
        if ours is None:
            ignored.append(key)
        else:
            renamed[ours] = value
    return renamed, ignored


def _in_file_naming(report: KeyReport, raw: dict[str, torch.Tensor]) -> KeyReport:
    """The report with keys named as the checkpoint file names them, so users can find them in their file."""
    official = not any(k.startswith(_OUR_PREFIXES) for k in raw)
    if not official:
        return report
    back = {}
    for key in raw:
        ours = official_to_ours(key)
        if ours is not None:
            back[ours] = key

    def name(entry: str) -> str:
        key, _, rest = entry.partition(" ")
        try:
            key = back.get(key) or ours_to_official(key)
        except KeyError:
            pass
        return f"{key} {rest}".rstrip()

    return KeyReport(missing=[name(k) for k in report.missing], unexpected=[name(k) for k in report.unexpected],
                     mismatched=[name(k) for k in report.mismatched], ignored=report.ignored)


def _check_schedule(state_dict: dict[str, torch.Tensor], config: XPortraitConfig) -> None:
    stored = state_dict.get("alphas_cumprod")
    if stored is None:
        return
    ours = make_alphas_cumprod(config.schedule)
    if stored.shape != ours.shape or (stored.float() - ours).abs().max() > 1e-6:
        raise CheckpointError("the checkpoint's noise schedule (alphas_cumprod) differs from X-Portrait's")


@functools.lru_cache(maxsize=8)
def expected_shapes(config: XPortraitConfig, with_text_encoder: bool) -> dict[str, torch.Size]:
    """Every key and shape of the model a config builds (built on the meta device: no memory, and cached)."""
    from .xportrait import XPortrait

    with torch.device("meta"):
        model = XPortrait(config, with_text_encoder=with_text_encoder)
    return {k: v.shape for k, v in model.state_dict().items()}


def compare_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> KeyReport:
    report = KeyReport()
    report.missing = sorted(k for k in expected if k not in state)
    report.unexpected = sorted(k for k in state if k not in expected)
    report.mismatched = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}"
                               for k in expected if k in state and state[k].shape != expected[k])
    return report


def _has_text_encoder(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("text_encoder.") for k in state)


def infer_config(state: dict[str, torch.Tensor], candidates: Optional[Iterable[XPortraitConfig]] = None) -> XPortraitConfig:
    """The preset (official, tiny) whose every key and shape the (our-key) state dict fits."""
    candidates = list(candidates or (XPortraitConfig.official(), XPortraitConfig.tiny()))
    with_text = _has_text_encoder(state)
    reports = []
    for config in candidates:
        report = compare_keys(state, expected_shapes(config, with_text))
        if report.fits:
            return config
        reports.append(report)
    best = min(reports, key=lambda r: len(r.missing) + len(r.unexpected) + len(r.mismatched))
    raise CheckpointError(f"not an X-Portrait checkpoint of a known size (closest preset: {best.describe()})")


def load_xportrait(source: Union[str, os.PathLike, dict], config: Optional[XPortraitConfig] = None,
                   dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                   operations: Optional[Operations] = None):
    """Build `XPortrait` from `operations` (None: plain PyTorch) and load a checkpoint (path or state dict) into
    it, refusing one that does not fit.

    The config is inferred from the checkpoint's shapes when not given. Weights are cast to `dtype`; the text
    encoder exists only when the checkpoint holds CLIP weights.
    """
    from .xportrait import XPortrait

    raw = read_state_dict(source) if not isinstance(source, dict) else source
    state, ignored = to_our_keys(raw)
    if config is None:
        config = infer_config(state)
    _check_schedule(raw, config)
    with_text = _has_text_encoder(state)
    with torch.device("meta"):
        model = XPortrait(config, with_text_encoder=with_text, operations=operations)
    report = compare_keys(state, {k: v.shape for k, v in model.state_dict().items()})
    report.ignored = ignored
    if not report.fits:
        name = Path(source).name if not isinstance(source, dict) else "state dict"
        raise CheckpointError(f"{name} does not fit X-Portrait: {_in_file_naming(report, raw).describe()}")
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    log.info("loaded X-Portrait (%d tensors, %d ignored official keys%s)", len(state), len(ignored),
             ", with CLIP text encoder" if with_text else ", no CLIP text encoder")
    return model.to(device).eval().requires_grad_(False)


def convert_checkpoint(source: Union[str, os.PathLike], destination: Union[str, os.PathLike],
                       dtype: torch.dtype = torch.float16) -> KeyReport:
    """Write an official checkpoint as one safetensors file in our key format (validated before writing).

    The destination must end in .safetensors (what the loader reads by) and must not be the source; it is written
    under a temporary name beside it and renamed once complete, so an interruption leaves no partial file."""
    from safetensors.torch import save_file

    from ..media.atomic import atomic_output

    source, destination = Path(source), Path(destination)
    if destination.suffix.lower() != ".safetensors":
        raise CheckpointError(f"convert writes safetensors: name the output *.safetensors, not {destination.name} "
                              "(the loader tells formats apart by the suffix)")
    if destination.exists() and source.exists() and os.path.samefile(source, destination):
        raise CheckpointError(f"the output {destination} is the input checkpoint: converting it in place would "
                              "replace the original; choose another output name")
    if not destination.parent.is_dir():
        raise CheckpointError(f"the output folder {destination.parent} does not exist; create it first")
    raw = read_state_dict(source)
    state, ignored = to_our_keys(raw)
    config = infer_config(state)
    _check_schedule(raw, config)
    report = compare_keys(state, expected_shapes(config, _has_text_encoder(state)))
    report.ignored = ignored
    if not report.fits:
        raise CheckpointError(f"{Path(source).name} does not fit X-Portrait: {_in_file_naming(report, raw).describe()}")
    preset = "official" if config == XPortraitConfig.official() else "tiny"
    # The positional-encoding tables are sinusoids, not trained weights: keep them exact.
    out = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("pos_encoder.pe") else v).contiguous()
           for k, v in state.items()}
    with atomic_output(destination) as partial:
        save_file(out, str(partial), metadata={"format": FORMAT_TAG, "config": preset, "dtype": str(dtype)})
    return report
