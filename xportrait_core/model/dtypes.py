"""The precision names every entry point takes (the Load node's dtype input, the CLI's --dtype, the benchmarks),
and the torch dtypes they stand for. Importing this module does not import torch, so argument parsers can list the
names cheaply."""
from __future__ import annotations

# Precision name -> torch dtype attribute: the dtypes the networks compute in (and hold their weights in).
PRECISIONS: dict[str, str] = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# Storage-only precisions (weight_storage.py): the diffusion networks' Linear and Conv2d weights are held in these
# and cast to a compute precision at every call.
STORAGE_PRECISIONS: dict[str, str] = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def dtype_named(name: str):
    """The torch dtype of a precision name ("fp16", "bf16" or "fp32")."""
    import torch  # noqa: PLC0415 - keeps importing the names cheap

    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: expected one of {', '.join(PRECISIONS)}")
    return getattr(torch, PRECISIONS[name])


def storage_dtype_named(name: str):
    """The torch dtype of a storage precision name ("fp8_e4m3fn" or "fp8_e5m2")."""
    import torch  # noqa: PLC0415

    if name not in STORAGE_PRECISIONS:
        raise ValueError(f"unknown storage precision {name!r}: expected one of {', '.join(STORAGE_PRECISIONS)}")
    return getattr(torch, STORAGE_PRECISIONS[name])
