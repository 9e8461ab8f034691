"""Launching the pack's Triton kernels by address while a CUDA graph records (fast/triton_launch.py): the argument
order the launcher is given, and the check of the installed Triton. The launch itself needs a GPU
(tests/gpu/test_cuda.py records under cudaMallocAsync)."""
from __future__ import annotations

import pytest

from xportrait_core.fast import triton_launch


def test_arguments_reach_the_launcher_in_the_kernels_order_with_defaults_and_without_launch_options():
    names = ["x", "out", "rows", "BLOCK_R", "BLOCK_C"]
    values = triton_launch.bound_values(names, {"BLOCK_C": 64}, ("X", "OUT", 7), {"BLOCK_R": 32, "num_warps": 4})
    assert values == ["X", "OUT", 7, 32, 64]
    with pytest.raises(TypeError, match="'BLOCK_R' was not given"):
        triton_launch.bound_values(names, {}, ("X", "OUT", 7), {"BLOCK_C": 64})
    with pytest.raises(TypeError, match="6 arguments for a kernel of 5 parameters"):
        triton_launch.bound_values(names, {}, tuple(range(6)), {})


def test_the_pack_s_kernels_bind_as_triton_binds_them():
    """For each kernel the pack launches, the parameter names Triton reports are those of the Python function,
    in order: what `bound_values` lines the arguments up against."""
    import inspect

    triton = pytest.importorskip("triton")
    from xportrait_core.fast import frame_attention, geglu, group_norm

    for kernel in (frame_attention._frame_attention_kernel, geglu._gated_gelu_kernel,
                   group_norm._channel_sums_kernel, group_norm._normalize_kernel):
        function = getattr(kernel, "fn", kernel)
        while hasattr(function, "fn"):  # the interpreter wraps the JIT function
            function = function.fn
        assert list(inspect.signature(function).parameters) == list(getattr(kernel, "arg_names",
                                                                            inspect.signature(function).parameters))
    assert triton is not None


def test_a_triton_without_the_launcher_it_needs_is_not_trusted(monkeypatch):
    triton_launch.capture_safe.cache_clear()
    try:
        monkeypatch.setattr(triton_launch, "triton", None)
        assert triton_launch.capture_safe() is False
    finally:
        triton_launch.capture_safe.cache_clear()
