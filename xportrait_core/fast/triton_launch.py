"""Launching the pack's Triton kernels so that a CUDA-graph recording under ComfyUI's allocator can hold them.

Under `cudaMallocAsync` (ComfyUI's default) the tensors a recording allocates are graph memory, which the driver
maps only when the graph first runs. Triton's launcher asks the driver about every tensor argument's address
(`cuPointerGetAttribute`) and refuses one it does not know as mapped, so a recording with a Triton kernel in it
failed there. The launcher takes an address given as a plain integer on trust. So while a recording is under way,
`launch` looks up the kernel Triton compiled for these arguments (`warmup`: the eager run that precedes every
recording compiled it) and calls that kernel's launcher with the tensors' addresses as integers, on the recording
stream; at all other times it is `kernel[grid](...)`.

`capture_safe()` says whether the running Triton offers what that takes (a compiled kernel's `run`, `function` and
`packed_metadata`, Triton 3.x); cuda_graphs.py records under cudaMallocAsync only then.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs usually lack it.
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def _recording() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def launch(kernel, grid: Sequence[int], *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, by addresses while a CUDA-graph recording is under way (module docstring).
    kwargs: the kernel's constexpr parameters and Triton's launch options (num_warps, ...)."""
    if not _recording():
        kernel[grid](*args, **kwargs)
        return
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    values = bound_values(kernel.arg_names, _defaults(kernel), args, kwargs)
    grid = tuple(grid) + (1, 1)
    stream = torch.cuda.current_stream().cuda_stream
    run = compiled.run  # first: it loads the kernel's module, which sets `function`
    run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
        *[v.data_ptr() if isinstance(v, torch.Tensor) else v for v in values])


def bound_values(arg_names: Sequence[str], defaults: dict, args: tuple, kwargs: dict) -> list:
    """The kernel's parameters in its order, as Triton's binder hands them to a launcher: positional arguments,
    then the named ones (launch options such as num_warps are not parameters), then defaults."""
    if len(args) > len(arg_names):
        raise TypeError(f"{len(args)} arguments for a kernel of {len(arg_names)} parameters")
    values = list(args)
    for name in arg_names[len(args):]:
        if name in kwargs:
            values.append(kwargs[name])
        elif name in defaults:
            values.append(defaults[name])
        else:
            raise TypeError(f"the kernel's parameter {name!r} was not given")
    return values


def _defaults(kernel) -> dict:
    return {p.name: p.default for p in getattr(kernel, "params", ()) if p.has_default}


@functools.lru_cache(maxsize=1)
def capture_safe() -> bool:
    """Whether this Triton's compiled kernels expose what `launch` calls while recording: a `run` launcher taking
    (grid x, y, z, stream, function, packed metadata, launch metadata, enter hook, exit hook, *arguments), as
    Triton's own `JITFunction.run` calls it (Triton 3.x)."""
    if triton is None:
        return False
    try:
        import inspect

        from triton.compiler.compiler import CompiledKernel
        from triton.runtime.jit import JITFunction

        kernel_source, jit_source = inspect.getsource(CompiledKernel), inspect.getsource(JITFunction.run)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    return (hasattr(CompiledKernel, "run") and "self.function" in kernel_source
            and "self.packed_metadata" in kernel_source
            and "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata" in jit_source)
