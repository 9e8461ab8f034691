"""Reading X-Portrait checkpoints: the one place where the official key names are mapped onto ours.

Accepted files: the released `model_state-415001.th` and any `.th` / `.ckpt` / `.pt` torch file (read with
`torch.load(weights_only=True)`, never unpickling code; a `state_dict` wrapper is unwrapped), and `.safetensors`,
in the official key format or ours (as written by `convert_checkpoint`).

Loading builds the model on the meta device and checks every key and shape: a checkpoint missing a key the model
needs, or holding one with another shape, is refused (with a count and one example). Extra keys (optimizer or EMA
entries a release file may also carry: the official script loads with `strict=False`) are ignored and reported
in one warning line. CLIP text-encoder keys (`cond_stage_model.*`) are kept for the text encoder when they are
CLIP ViT-L/14's; the DDPM schedule buffers are checked against ours.

The file type is recognised by its first bytes, not its name: a safetensors file renamed `.th` loads as the
safetensors file it is. Errors say what is wrong with the file in words (incomplete download, training pickle,
not X-Portrait), never torch's own paragraphs.
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

# The one list of checkpoint file suffixes: ComfyUI's model folder, the loader node and the CLI all use it.
CHECKPOINT_SUFFIXES = (".th", ".ckpt", ".pt", ".pth", ".safetensors")
CONVERT_COMMAND = "python -m xportrait_core convert IN.th OUT.safetensors"
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
        """Every key the model needs is present with its shape (extra keys are allowed: they are ignored)."""
        return not (self.missing or self.mismatched)

    def describe(self) -> str:
        """What does not fit, as counts with one example each (a user needs the size of the problem and one key to
        look for, not hundreds of internal names)."""
        parts = []
        for name, keys in (("missing", self.missing), ("with the wrong shape", self.mismatched)):
            if keys:
                parts.append(f"{len(keys)} {'key' if len(keys) == 1 else 'keys'} {name} (e.g. {keys[0]})")
        return "; ".join(parts) or "all keys fit"

    def extra_keys_warning(self) -> Optional[str]:
        """One line naming the extra keys that were ignored, or None."""
        if not self.unexpected:
            return None
        count = len(self.unexpected)
        return (f"{count} extra {'key' if count == 1 else 'keys'} in the checkpoint {'is' if count == 1 else 'are'} "
                f"not part of X-Portrait and {'was' if count == 1 else 'were'} ignored (e.g. {self.unexpected[0]})")


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


SAFETENSORS = "safetensors"
TORCH_ZIP = "torch zip"
TORCH_LEGACY = "torch legacy"


def sniff_format(path: Union[str, os.PathLike]) -> Optional[str]:
    """The checkpoint format a file's first bytes show, whatever its name says; None when they show none.

    safetensors: an 8-byte little-endian header length, then the JSON header ('{'). torch.save: a zip archive
    ('PK'), or the legacy format (a pickle protocol mark, 0x80).
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000:
        return SAFETENSORS
    if head[:2] == b"PK":
        return TORCH_ZIP
    if head[:1] == b"\x80":
        return TORCH_LEGACY
    return None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(
            f"{path.name} is not a complete safetensors file (damaged, or the download stopped early): download it "
            "again") from exc


def _torch_load(path: Path, fmt: Optional[str]) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=fmt == TORCH_ZIP)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format


def _read_torch(path: Path, fmt: Optional[str]) -> object:
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # torch's remarks on pickle protocols are not for users
            warnings.simplefilter("ignore", UserWarning)
            return _torch_load(path, fmt)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, i.e. running the file's code: the wrong way for a user.
        raise CheckpointError(
            f"{path.name} holds Python objects besides the weights (a training pickle), and loading those could run "
            "code, so it is refused. Use the released model_state-415001.th, or re-save only its tensors "
            "(torch.save(state_dict, ...)) on a machine you trust, then convert them to .safetensors with "
            f"`{CONVERT_COMMAND}`") from None
    except Exception as exc:
        if fmt is None:
            raise CheckpointError(
                f"{path.name} is not a checkpoint: its contents are neither a torch checkpoint nor a safetensors "
                "file (is it an HTML page saved by a download link?)") from None
        raise CheckpointError(
            f"{path.name} is incomplete or damaged (a download that stopped early?): download it again "
            f"({type(exc).__name__})") from None


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, on CPU, without executing any code from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"{path.name}: not a checkpoint file (expected one of {', '.join(CHECKPOINT_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path.name} is empty (0 bytes): download it again")
    fmt = sniff_format(path)
    if fmt == SAFETENSORS:  # whatever the suffix: a renamed safetensors file is still one
        if path.suffix.lower() != ".safetensors":
            log.info("%s is a safetensors file (despite its suffix): read as safetensors", path.name)
        return _read_safetensors(path)
    if path.suffix.lower() == ".safetensors":
        raise CheckpointError(
            f"{path.name} is not a safetensors file (its first bytes are not a safetensors header): damaged, or "
            "another format renamed: download it again")
    data = _read_torch(path, fmt)
    while isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} does not hold model weights (it holds a {type(data).__name__})")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path.name} does not hold model weights (no tensors in it)")
    # Non-tensor entries (a step counter, an optimizer's settings) are training leftovers: skipped, like extra keys.
    return tensors


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
    """The preset (official, tiny) whose every key and shape the (our-key) state dict fits; when none fits, the
    closest preset if it matches at least half of its keys (the loader then names what does not fit), else an
    error: not an X-Portrait checkpoint."""
    candidates = list(candidates or (XPortraitConfig.official(), XPortraitConfig.tiny()))
    with_text = _has_text_encoder(state)
    reports = []
    for config in candidates:
        report = compare_keys(state, expected_shapes(config, with_text))
        if report.fits:
            return config
        reports.append(report)
    best_config, best = min(zip(candidates, reports), key=lambda cr: len(cr[1].missing) + len(cr[1].mismatched))
    if len(best.missing) + len(best.mismatched) <= len(expected_shapes(best_config, with_text)) // 2:
        return best_config  # an X-Portrait checkpoint with a few keys wrong: the caller names them, as the file does
    raise CheckpointError(f"not an X-Portrait checkpoint of a known size: compared with the closest X-Portrait "
                          f"model, {best.describe()}. Use model_state-415001.th from the X-Portrait release, or its "
                          ".safetensors conversion")


def load_xportrait(source: Union[str, os.PathLike, dict], config: Optional[XPortraitConfig] = None,
                   dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                   operations: Optional[Operations] = None, warnings: Optional[list] = None,
                   storage_dtype: Optional[torch.dtype] = None):
    """Build `XPortrait` from `operations` (None: plain PyTorch) and load a checkpoint (path or state dict) into
    it, refusing one that does not fit.

    The config is inferred from the checkpoint's shapes when not given. Weights are cast to `dtype`, the dtype the
    networks compute in; with `storage_dtype` (fp8, see weight_storage.py) the diffusion networks' Linear and Conv2d
    weights are held in it instead, cast straight from the file's tensors (`operations` must then cast weights at
    every call). The text encoder exists only when the checkpoint holds CLIP weights. Extra keys are ignored with
    one warning line, logged and appended to `warnings` when given (the loader node shows it to the user).
    """
    from .weight_storage import check_storage, stored_parameter_names
    from .xportrait import XPortrait

    if storage_dtype is not None:
        check_storage(storage_dtype, operations)

    raw = read_state_dict(source) if not isinstance(source, dict) else source
    name = Path(source).name if not isinstance(source, dict) else "state dict"
    state, ignored = to_our_keys(raw)
    if config is None:
        try:
            config = infer_config(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{name} is {exc}") from None
    _check_schedule(raw, config)
    with_text = _has_text_encoder(state)
    with torch.device("meta"):
        model = XPortrait(config, with_text_encoder=with_text, operations=operations)
    report = compare_keys(state, {k: v.shape for k, v in model.state_dict().items()})
    report.ignored = ignored
    if not report.fits:
        raise CheckpointError(f"{name} does not fit X-Portrait: {_in_file_naming(report, raw).describe()}")
    extra = _in_file_naming(report, raw).extra_keys_warning()
    if extra:
        log.warning("X-Portrait: %s: %s", name, extra)
        if warnings is not None:
            warnings.append(extra)
    stored = stored_parameter_names(model) if storage_dtype is not None else set()
    state = {k: (v.to(storage_dtype if k in stored else dtype) if v.is_floating_point() else v)
             for k, v in state.items() if k not in report.unexpected}
    model.load_state_dict(state, assign=True)
    log.info("loaded X-Portrait (%d tensors, %d ignored official keys%s%s)", len(state), len(ignored),
             ", with CLIP text encoder" if with_text else ", no CLIP text encoder",
             f", {len(stored)} stored in {storage_dtype}" if stored else "")
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
    extra = _in_file_naming(report, raw).extra_keys_warning()
    if extra:
        log.warning("X-Portrait: %s: %s (not written to the converted file)", Path(source).name, extra)
        state = {k: v for k, v in state.items() if k not in report.unexpected}
    preset = "official" if config == XPortraitConfig.official() else "tiny"
    # The positional-encoding tables are sinusoids, not trained weights: keep them exact.
    out = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("pos_encoder.pe") else v).contiguous()
           for k, v in state.items()}
    with atomic_output(destination) as partial:
        save_file(out, str(partial), metadata={"format": FORMAT_TAG, "config": preset, "dtype": str(dtype)})
    return report
