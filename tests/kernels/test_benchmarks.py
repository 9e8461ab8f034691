"""The GPU benchmark script keeps working: a smoke run of the tiny model on the CPU, and its kernel summary."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from triton_interpreter import run_interpreted

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def _bench_module(name: str = "bench_gpu"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_kinds_sum_profiled_time_by_kind():
    bench = _bench_module()
    totals = bench.kernel_kind_totals([
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 3000.0),
        ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT", 1000.0),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", 2500.0),
        ("xportrait_core.fast.frame_attention._frame_attention_kernel", 500.0),
        ("triton_red_fused_native_group_norm_silu_0", 700.0),
        ("void at::native::elementwise_kernel<128, 2>", 200.0),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy", 400.0),
        ("sm90_xmma_fprop_implicit_gemm_bf16", 900.0),
        ("something_else", 10.0),
    ])
    assert totals == {"matrix products": 4.0, "attention": 3.0, "convolutions": 0.9, "inductor fused": 0.7,
                      "copies and concatenation": 0.4, "elementwise": 0.2, "other": 0.01}
    assert list(totals) == sorted(totals, key=lambda k: -totals[k])


def test_kernel_time_is_attributed_to_the_packs_innermost_function():
    bench = _bench_module()
    rows = bench.time_by_source([
        ("aten::copy_", ["xportrait_core/model/temporal.py(91): forward", "xportrait_core/model/unet.py(200): forward"], 40.0),
        ("aten::copy_", ["torch/nn/functional.py(10): f", "xportrait_core/model/temporal.py(91): forward"], 60.0),
        ("aten::add", ["xportrait_core/model/blocks.py(77): forward"], 500.0),
        ("aten::add", [], 30.0),
        ("aten::empty", ["xportrait_core/model/blocks.py(77): forward"], 0.0),
    ])
    assert rows == [
        {"op": "aten::add", "where": "xportrait_core/model/blocks.py(77): forward", "ms": 0.5, "calls": 1},
        {"op": "aten::copy_", "where": "xportrait_core/model/temporal.py(91): forward", "ms": 0.1, "calls": 2},
        {"op": "aten::add", "where": "(no Python stack)", "ms": 0.03, "calls": 1},
    ]


def test_smoke_run_on_the_cpu(tmp_path):
    out = tmp_path / "records.jsonl"
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--config", "tiny", "--resolution", "64",
                          "--frames", "4", "--runs", "1", "--dtype", "fp32", "--networks", "--phases", "--profile",
                          "--profile-sources",
                          "--decode-chunk", "2", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    (video,) = [r for r in records if r["kind"] == "video"]
    assert video["frames"] == 4 and video["timesteps"] == 31 and video["seconds"] > 0
    assert video["dtype"] == "torch.float32" and video["attention"] == "sdpa"
    networks = {r["name"]: r["seconds"] for r in records if r["kind"] == "network"}
    assert "eps_branches (controls + both branches in one UNet batch)" in networks
    assert all(seconds > 0 for seconds in networks.values())
    # --profile: one window call and one decode chunk, their time by kernel kind (CPU ops stand in here).
    profiles = {r["what"]: r for r in records if r["kind"] == "profile"}
    assert list(profiles) == ["guided window call (16 frames)", "vae decode (2 frames)"]
    assert all(p["convolutions"] > 0 for p in profiles.values())
    # --profile-sources: the window call's time by op and the pack's function that ran it.
    (sources,) = [r["rows"] for r in records if r["kind"] == "profile_sources"]
    assert sources and all(r["ms"] > 0 and r["calls"] > 0 for r in sources)
    assert any("convolution" in r["op"] and "blocks.py" in r["where"] for r in sources), sources[:5]
    assert any("xportrait_core" in r["where"] and ".py" in r["where"] for r in sources), sources[:5]
    (phases,) = [r["milliseconds"] for r in records if r["kind"] == "phases"]
    # One window call per timestep for 4 frames; the first two are shown apart (eager run, graph recording).
    assert "window call 1" in phases and "window call 2" in phases and "window call 3" not in phases
    parts = [v for k, v in phases.items() if k not in ("later window call (median)", "total", "host total")]
    assert abs(sum(parts) - phases["total"]) < 1.0 and phases["later window calls (sum)"] > 0


def test_inductor_settings_are_applied_or_refused():
    import torch._inductor.config as inductor_config

    bench = _bench_module()
    before = inductor_config.coordinate_descent_tuning
    try:
        bench.set_inductor_options([f"coordinate_descent_tuning={not before}"])
        assert inductor_config.coordinate_descent_tuning is (not before)
    finally:
        inductor_config.coordinate_descent_tuning = before
    with pytest.raises(SystemExit, match="no setting 'no_such_setting'"):
        bench.set_inductor_options(["no_such_setting=1"])


def test_window_flops_are_split_by_kernel_kind():
    import torch

    from xportrait_core.model.config import XPortraitConfig

    bench = _bench_module()
    model = bench.build_random_model(XPortraitConfig.tiny(), torch.float32, "cpu")
    flops = bench.window_flops_by_kind(model, resolution=64, frames=4)
    # (PyTorch's counter has no formula for SDPA's CPU kernel, so "attention" appears on GPUs only.)
    assert {"convolutions", "matrix products"} <= set(flops)
    assert all(count > 0 for count in flops.values())
    # Twice the frames: the UNet, ControlNet and attention work doubles, the reference net's (batch 1) does not.
    doubled = bench.window_flops_by_kind(model, resolution=64, frames=8)
    assert 1.8 < sum(doubled.values()) / sum(flops.values()) < 2.0


GEGLU_INTERPRETED = r"""
import importlib.util
spec = importlib.util.spec_from_file_location("bench_geglu", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
results = []
# (input shape, inner width, tile config): edges that fill no tile, a K that is no multiple of BLOCK_K, 3-D input.
for shape, inner, config in (((37, 48), 40, (16, 16, 16, 4, 1)), ((2, 65, 64), 96, (32, 32, 32, 4, 1)),
                             ((5, 20), 24, (16, 16, 16, 4, 1))):
    x = torch.randn(*shape, dtype=torch.float16)
    weight = torch.randn(2 * inner, shape[-1], dtype=torch.float16) / shape[-1] ** 0.5
    bias = torch.randn(2 * inner, dtype=torch.float16)
    out = bench.fused_geglu(x, weight, bias, config)
    ref = bench.geglu_reference(x.float(), weight.float(), bias.float())
    results.append([list(out.shape), list(ref.shape), (out.float() - ref).abs().max().item(), ref.abs().max().item()])
print(json.dumps(results))
"""


def test_fused_geglu_candidate_matches_the_packs_geglu_in_the_interpreter():
    """The candidate kernel bench_geglu.py times computes what blocks.GEGLU does, so its timings compare like with
    like."""
    import torch

    from xportrait_core.model.blocks import GEGLU

    bench = _bench_module("bench_geglu")
    module = GEGLU(24, 40)
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        assert torch.allclose(bench.geglu_reference(x, module.proj.weight, module.proj.bias), module(x), atol=1e-6)
    for out_shape, ref_shape, err, scale in run_interpreted(GEGLU_INTERPRETED,
                                                            str(ROOT / "benchmarks" / "bench_geglu.py")):
        assert out_shape == ref_shape
        assert err < 2e-3 * max(1.0, scale), (out_shape, err)  # fp16 output rounding



def test_strided_ops_census_sees_the_layouts_the_gpu_would_run(tmp_path):
    """benchmarks/strided_ops.py on the tiny model (in its own process: it replaces the kernels' entry points with
    stand-ins): it finds the motion modules' frame-major transposes, copies the uncompiled path still makes, and no
    copy of an attention output (5a14970 removed the last one)."""
    out = tmp_path / "ops.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "strided_ops.py"), "--config", "tiny",
                          "--resolution", "64", "--json", str(out)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())
    sites = {(r["op"], r["site"].split(":")[0]) for r in rows}
    assert ("clone.default", "temporal.py") in sites
    assert ("clone.default", "blocks.py") not in sites
    assert all(r["calls"] > 0 and r["elements"] > 0 for r in rows)


def test_profile_sources_is_refused_where_it_could_not_see_the_stacks():
    bench = _bench_module()
    with pytest.raises(SystemExit, match="goes with --profile"):
        bench.main(["--profile-sources"])
    with pytest.raises(SystemExit, match="--cuda-graphs 0"):
        bench.main(["--profile", "--profile-sources"])  # on a GPU, graphs on by default
