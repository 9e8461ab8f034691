"""The precision names every entry point takes (the Load node's dtype input, the CLI's --dtype, the benchmarks),
and the torch dtypes they stand for. Importing this module does not import torch, so argument parsers can list the
names cheaply."""
from __future__ import annotations

# Precision name -> torch dtype attribute.
PRECISIONS: dict[str, str] = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def dtype_named(name: str):
    """The torch dtype of a precision name ("fp16", "bf16" or "fp32")."""
    import torch  # noqa: PLC0415 - keeps importing the names cheap

    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: expected one of {', '.join(PRECISIONS)}")
    return getattr(torch, PRECISIONS[name])
