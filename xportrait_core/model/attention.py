"""The attention dispatch of the plain-PyTorch operations.

Every attention in the pack (spatial self/cross attention with the reference bank, temporal attention, the VAE's
mid-block attention, CLIP's causal attention) calls its `Operations.attention(q, k, v)`; in
`operations.torch_operations()` that is `attention` below, which picks a backend:

- ``xformers``: `xformers.ops.memory_efficient_attention`, used when it imports *and* a probe call succeeds for
  the device type and dtype at hand. Published xformers wheels target one torch version; a wheel built for another
  imports but fails at the first kernel call, so importing is not proof enough. The probe runs once per
  (device type, dtype) and its answer is remembered.
- ``sdpa``: `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient / math kernels chosen by
  PyTorch). Always available; the fallback.
- ``math``: explicit ``softmax(q k^T / sqrt(d)) v`` in float32, for checking the other two only.

`fast/operations.py` wraps it with a kernel for the motion modules' short sequences.

``XPORTRAIT_ATTENTION=auto|xformers|sdpa|math`` or `set_attention_backend()` forces a choice; forcing xformers
where it cannot run raises instead of silently falling back. The backend actually used is logged once per
(device type, dtype).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..switches import setting, switch

log = logging.getLogger("xportrait")

BACKENDS = switch("XPORTRAIT_ATTENTION").choices

_setting: str = setting("XPORTRAIT_ATTENTION")

_xformers_ops = None
_xformers_import_error: Optional[str] = None
_xformers_works: dict[tuple[str, torch.dtype], bool] = {}
_xformers_probe_errors: dict[tuple[str, torch.dtype], str] = {}
_logged: set[tuple[str, str, torch.dtype]] = set()
_resolved: dict[tuple[str, torch.dtype], str] = {}

# CUDA attention kernels launch one block row per (batch x head); grids past 65535 fail on some kernels, so very
# large batches (temporal attention over every pixel of a 64x64 latent) are split.
_MAX_BATCH_HEADS = 65535


def set_attention_backend(name: str) -> None:
    """Force a backend for all later calls: 'auto', 'xformers', 'sdpa' or 'math'."""
    global _setting
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: expected one of {', '.join(BACKENDS)}")
    _setting = name
    _resolved.clear()


def get_attention_backend_setting() -> str:
    return _setting


def _load_xformers():
    global _xformers_ops, _xformers_import_error
    if _xformers_ops is None and _xformers_import_error is None:
        try:
            import xformers.ops as ops  # noqa: PLC0415 - optional dependency, imported on first use

            _xformers_ops = ops
        except Exception as exc:  # ImportError, or a binary built against another torch
            _xformers_import_error = f"{type(exc).__name__}: {exc}"
    return _xformers_ops


def xformers_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether xformers' memory-efficient attention imports and runs for this device type and dtype (probed once)."""
    if device.type != "cuda":
        # xformers' kernels are CUDA kernels; its CPU path is a slow reference, never faster than SDPA.
        return False
    key = (device.type, dtype)
    if key not in _xformers_works:
        ops = _load_xformers()
        works = False
        if ops is not None:
            try:
                q = torch.randn(1, 8, 1, 64, device=device, dtype=dtype)
                out = ops.memory_efficient_attention(q, q, q)
                works = bool(torch.isfinite(out).all().item())
            except Exception as exc:  # wheel built for another torch/CUDA, or dtype unsupported
                log.info("xformers is installed but failed on %s/%s: %s", device.type, dtype, exc)
                _xformers_probe_errors[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        _xformers_works[key] = works
    return _xformers_works[key]


def resolve_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend `attention()` will use for tensors of this device and dtype."""
    if _setting == "auto":
        return "xformers" if xformers_usable(device, dtype) else "sdpa"
    if _setting == "xformers" and not xformers_usable(device, dtype):
        dtype_name = str(dtype).replace("torch.", "")
        if device.type != "cuda":
            reason = f"xformers runs on NVIDIA GPUs only, and this runs on the {device.type.upper()}"
        elif _xformers_import_error:
            reason = f"xformers does not import ({_xformers_import_error.splitlines()[0][:200]})"
        else:
            probe = _xformers_probe_errors.get((device.type, dtype), "its test call gave non-finite values")
            reason = (f"xformers is installed but fails on this GPU in {dtype_name} (a wheel built for another "
                      f"torch or CUDA version?): {probe}")
        raise RuntimeError(f"attention 'xformers' cannot run: {reason}. Choose 'auto' (uses xformers where it works) "
                           "or 'sdpa'.")
    return _setting


def resolve_once(device: torch.device, dtype: torch.dtype) -> str:
    """Resolve once per (device type, dtype), log the choice, and remember it: later calls (compiled graphs
    included) only look it up."""
    backend = resolve_backend(device, dtype)
    key = (backend, device.type, dtype)
    if key not in _logged:
        _logged.add(key)
        log.info("X-Portrait attention backend: %s (%s, %s)", backend, device.type, str(dtype).replace("torch.", ""))
    _resolved[(device.type, dtype)] = backend
    return backend


def _math_attention(q, k, v, causal: bool):
    scale = 1.0 / math.sqrt(q.shape[-1])
    weights = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * scale
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        weights = weights.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhij,bhjd->bhid", weights.softmax(dim=-1), v.float())
    return out.to(q.dtype)


def _xformers_attention(q, k, v, causal: bool):
    ops = _xformers_ops
    bias = ops.LowerTriangularMask() if causal else None
    # xformers takes (batch, tokens, heads, dim).
    out = ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def _run(backend: str, q, k, v, causal: bool):
    if backend == "math":
        return _math_attention(q, k, v, causal)
    if backend == "xformers":
        return _xformers_attention(q, k, v, causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, Nq, D), k and v (B, H, Nk, D); returns (B, H, Nq, D).

    k and v may be expanded views (stride 0 over the batch), as the reference bank is: they are made contiguous
    only where a backend needs it.
    """
    backend = _resolved.get((q.device.type, q.dtype))
    if backend is None:
        backend = resolve_once(q.device, q.dtype)
    if backend == "xformers":
        k, v = k.contiguous(), v.contiguous()
    batch, heads = q.shape[0], q.shape[1]
    if q.device.type == "cuda" and batch * heads > _MAX_BATCH_HEADS:
        step = max(1, _MAX_BATCH_HEADS // heads)
        return torch.cat([_run(backend, q[i:i + step], k[i:i + step], v[i:i + step], causal)
                          for i in range(0, batch, step)])
    return _run(backend, q, k, v, causal)
