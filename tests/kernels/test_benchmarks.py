"""The GPU benchmark scripts keep working: smoke runs of the tiny model on the CPU, and their summaries."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import golden_path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _bench_module(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared bench_common
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_job_benchmark_alternates_two_trees_and_reports_each(tmp_path):
    """bench_job.py's A/B: two workers (this tree, and this tree again under another environment, standing in for
    another checkout), timed jobs alternating A B A B, the medians, peaks and phases of each."""
    out = tmp_path / "records.jsonl"
    run = _run("bench_job.py", "--device", "cpu", "--config", "tiny", "--resolution", "64", "--frames", "4",
               "--steps", "3", "--runs", "2", "--dtype", "fp32", "--compile", "off", "--compare-with", str(ROOT),
               "--compare-env", "XPORTRAIT_CUDA_GRAPHS=0", "--phases", "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    records = _records(out)
    workers = {r["name"]: r for r in records if r["kind"] == "worker"}
    assert set(workers) == {"A", "B"} and all(w["tree"] == str(ROOT) for w in workers.values())
    assert workers["B"]["env"] == {"XPORTRAIT_CUDA_GRAPHS": "0"} and workers["A"]["env"] == {}
    runs = [r for r in records if r["kind"] == "run"]
    assert [(r["name"], r["round"]) for r in runs] == [("A", 0), ("B", 0), ("A", 1), ("B", 1)]
    assert all(r["seconds"] > 0 and r["window_calls"] == 4 for r in runs)  # 3 DDIM steps: 4 timesteps, one window
    jobs = {r["name"]: r for r in records if r["kind"] == "job"}
    for name, job in jobs.items():
        assert sorted(job["runs"]) == sorted(r["seconds"] for r in runs if r["name"] == name)
        assert job["seconds"] == pytest.approx(sum(job["runs"]) / 2, abs=1e-3)  # the median of two runs
        phases = job["phases_ms"]
        parts = [v for k, v in phases.items() if k not in ("later window call (median)", "total", "host total")
                 and v is not None]
        assert abs(sum(parts) - phases["total"]) < 1.0 and phases["later window calls (sum)"] > 0
    (comparison,) = [r for r in records if r["kind"] == "comparison"]
    a, b = jobs["A"]["runs"], jobs["B"]["runs"]
    assert comparison["b_minus_a_each_round"] == [round(y - x, 3) for x, y in zip(a, b)]
    assert "B - A (off, native)" in run.stdout


def test_job_flops_are_a_fixed_part_and_a_part_per_window_call():
    """The two-job extrapolation of bench_job.py's FLOP count agrees with counting a longer job directly."""
    import argparse

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    job_bench = _bench_module("bench_job")
    model = job_bench.common.build_random_model("tiny", torch.float32, "cpu")
    job = job_bench.common.VideoJob(model, frames=2, resolution=64, decode_chunk=2)
    args = argparse.Namespace(guidance=5.0, overlap=4)
    fixed, per_call = job_bench._job_flops(job, args)
    assert fixed > 0 and per_call > 0
    calls = []
    with FlopCounterMode(display=False) as counter:
        job.run(steps=3, callback=lambda done, total: calls.append(total))
    assert calls[-1] == 4
    assert counter.get_total_flops() == pytest.approx(fixed + 4 * per_call, rel=1e-9)


def test_job_benchmark_refuses_a_tree_without_the_package(tmp_path):
    job_bench = _bench_module("bench_job")
    with pytest.raises(SystemExit, match="no xportrait_core package"):
        job_bench.main(["--compare-with", str(tmp_path), "--device", "cpu"])


def test_window_profile_on_the_cpu(tmp_path, monkeypatch):
    """profile_window.py (its main, in this process: the CPU needs no allocator restart) on the tiny model: the
    window call and a decode chunk by kernel kind, the call's time by the pack's function that ran it, and one
    call of each network."""
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # set here, so the script leaves the process's alone
    monkeypatch.setenv("XPORTRAIT_CUDA_GRAPHS", "1")  # the script sets it: restored after the test
    profile = _bench_module("profile_window")
    out = tmp_path / "records.jsonl"
    assert profile.main(["--device", "cpu", "--config", "tiny", "--resolution", "64", "--frames", "4", "--dtype",
                         "fp32", "--decode", "--decode-chunk", "2", "--sources", "--networks", "--banks", "--repeats",
                         "1",
                         "--json", str(out)]) == 0
    records = _records(out)
    # One window call and one decode chunk, their time by kernel kind (CPU ops stand in here).
    profiles = {r["what"]: r for r in records if r["kind"] == "profile"}
    assert list(profiles) == ["guided window call (4 frames)", "vae decode (2 frames)"]
    assert all(p["convolutions"] > 0 for p in profiles.values())
    (sources,) = [r["rows"] for r in records if r["kind"] == "profile_sources"]
    assert sources and all(r["ms"] > 0 and r["calls"] > 0 for r in sources)
    assert any("convolution" in r["op"] and "blocks.py" in r["where"] for r in sources), sources[:5]
    networks = {r["name"]: r["seconds"] for r in records if r["kind"] == "network"}
    assert "both branches (controls + both branches in one UNet batch)" in networks and len(networks) == 8
    assert all(seconds > 0 for seconds in networks.values())
    # --banks: the 31 timesteps' banks one at a time, 16 a call and all 31 in one call.
    (banks,) = [r for r in records if r["kind"] == "banks"]
    assert banks["timesteps"] == 31
    assert banks["one at a time s"] > 0 and banks["16 a call s"] > 0 and banks["31 a call s"] > 0
    assert banks["one chunk of banks MiB"] > 0


def test_window_profile_refuses_sources_where_it_could_not_see_the_stacks():
    profile = _bench_module("profile_window")
    with pytest.raises(SystemExit, match="--cuda-graphs 0"):
        profile.main(["--sources"])  # on a GPU, graphs on by default


def test_kernel_kinds_sum_profiled_time_by_kind():
    profile = _bench_module("profile_window")
    totals = profile.kernel_kind_totals([
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
    profile = _bench_module("profile_window")
    rows = profile.time_by_source([
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


def test_window_flops_are_split_by_kernel_kind():
    import torch

    profile = _bench_module("profile_window")
    model = profile.common.build_random_model("tiny", torch.float32, "cpu")
    flops = profile.window_flops_by_kind(model, resolution=64, frames=4)
    # (PyTorch's counter has no formula for SDPA's CPU kernel, so "attention" appears on GPUs only.)
    assert {"convolutions", "matrix products"} <= set(flops)
    assert all(count > 0 for count in flops.values())
    # Twice the frames: the UNet, ControlNet and attention work doubles, the reference net's (batch 1) does not.
    doubled = profile.window_flops_by_kind(model, resolution=64, frames=8)
    assert 1.8 < sum(doubled.values()) / sum(flops.values()) < 2.0


def test_inductor_settings_are_applied_or_refused():
    import torch._inductor.config as inductor_config

    common = _bench_module("bench_common")
    before = inductor_config.coordinate_descent_tuning
    try:
        common.set_inductor_options([f"coordinate_descent_tuning={not before}"])
        assert inductor_config.coordinate_descent_tuning is (not before)
    finally:
        inductor_config.coordinate_descent_tuning = before
    with pytest.raises(SystemExit, match="no setting 'no_such_setting'"):
        common.set_inductor_options(["no_such_setting=1"])


def test_golden_check_in_float32_on_the_cpu():
    """check_golden_gpu.py's comparison (here on the CPU, float32) finds the pack within float32 noise of the
    official recording."""
    import torch

    golden = golden_path("tiny_cases.safetensors").parent
    check = _bench_module("check_golden_gpu")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        check.check_golden(golden, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    record = check.RECORDS.items[-1]
    assert record["kind"] == "golden" and record["dtype"] == "torch.float32"
    assert record["eps_cond_rel"] < 1e-5 and record["eps_uncond_rel"] < 1e-5
    assert record["sample16_rel"] < 1e-4 and record["sample20_rel"] < 1e-4


def test_comfy_benchmarks_graph_variants_joined_by_plus_apply_together_and_restore(monkeypatch):
    """bench_comfy.py --ab graphs_off+group_norm: one B arm with both applied; graphs_short_runs lowers the run
    length graphs need to 0; each is undone after its run, also after a failed one; unknown names are refused."""
    import argparse

    from xportrait_core.fast import cuda_graphs, group_norm

    bench = _bench_module("bench_comfy")
    monkeypatch.setattr(group_norm, "_enabled", True)
    monkeypatch.delenv("XPORTRAIT_CUDA_GRAPHS", raising=False)
    bar = cuda_graphs.MIN_GRAPHED_STEPS
    assert bench.variant_name("graphs_off+group_norm") == "graphs_off+group_norm"
    with bench.apply_variant("graphs_off+group_norm"):
        assert not cuda_graphs.cuda_graphs_enabled() and not group_norm._enabled
    assert cuda_graphs.cuda_graphs_enabled() and group_norm._enabled
    with pytest.raises(RuntimeError):
        with bench.apply_variant("graphs_short_runs"):
            assert cuda_graphs.MIN_GRAPHED_STEPS == 0
            raise RuntimeError("a B run failed")
    assert cuda_graphs.MIN_GRAPHED_STEPS == bar > 0
    with pytest.raises(argparse.ArgumentTypeError, match="no_such_variant"):
        bench.variant_name("graphs_off+no_such_variant")


def test_comfy_benchmarks_kernel_off_variants_turn_their_kernel_off_and_back(monkeypatch):
    """bench_comfy.py --ab group_norm / layer_norm / conv_bias: B runs with that kernel's switch off (as its
    environment variable at 0 gives), the other kernels untouched, A with it as it was, also after a B run that
    failed."""
    from xportrait_core.fast import conv_bias, group_norm, layer_norm

    bench = _bench_module("bench_comfy")
    kernels = {"group_norm": group_norm, "layer_norm": layer_norm, "conv_bias": conv_bias}
    for module in kernels.values():
        monkeypatch.setattr(module, "_enabled", True)
    for variant, module in kernels.items():
        with bench.VARIANTS[variant]():
            assert not module._enabled
            assert all(other._enabled for other in kernels.values() if other is not module)  # only its own
        assert module._enabled
        with pytest.raises(RuntimeError):
            with bench.VARIANTS[variant]():
                raise RuntimeError("a B run failed")
        assert module._enabled


def test_comfy_benchmarks_norm_fusions_variant_runs_the_separate_operations_and_restores_the_fused_ones():
    """bench_comfy.py --ab norm_fusions: B runs a ResBlock's and a motion block's norms as separate operations (the
    fused forms never called), with the same result; A's fused forms come back, also after a B run that failed."""
    from xportrait_core.model import blocks, temporal

    bench = _bench_module("bench_comfy")
    fused = blocks.norm_silu, temporal.norm_plus

    class Norm(torch.nn.GroupNorm):
        def forward_silu(self, x, shift=None):
            raise AssertionError("the fused form ran under norm_fusions")

    norm, x, shift = Norm(2, 4), torch.randn(2, 4, 3, 3), torch.randn(2, 4)
    with bench.apply_variant("norm_fusions"):
        assert (blocks.norm_silu, temporal.norm_plus) != fused
        torch.testing.assert_close(blocks.norm_silu(norm, x, shift),
                                   torch.nn.functional.silu(torch.nn.GroupNorm.forward(norm, x + shift[..., None, None])))
    assert (blocks.norm_silu, temporal.norm_plus) == fused
    with pytest.raises(RuntimeError):
        with bench.apply_variant("norm_fusions+layer_norm"):
            raise RuntimeError("a B run failed")
    assert (blocks.norm_silu, temporal.norm_plus) == fused


def test_comfy_benchmarks_keep_graphs_off_records_afresh_every_run_and_restores(tiny_model):
    """bench_comfy.py --ab keep_graphs_off: inside it a VideoDenoiser gets no kept graphs (it records its own and
    releases them), so the A runs' kept graphs stay untouched; outside it the keeper is used again."""
    from xportrait_core.fast.kept_graphs import KeptWindowGraphs
    from xportrait_core.sampling.video_denoiser import VideoDenoiser

    bench = _bench_module("bench_comfy")
    reference = torch.zeros(1, 4, 8, 8)
    kept = KeptWindowGraphs()
    with bench.apply_variant("keep_graphs_off"):
        assert VideoDenoiser(tiny_model, reference, cuda_graphs=True, kept_graphs=kept).kept_graphs is None
    assert VideoDenoiser(tiny_model, reference, cuda_graphs=True, kept_graphs=kept).kept_graphs is kept


@pytest.mark.parametrize("variant", ["graphs_off", "keep_graphs_off", "graphs_short_runs"])
def test_comfy_benchmarks_graph_variants_leave_the_a_runs_kept_graphs_alone(tiny_model, monkeypatch, variant):
    """A B A B with a graph variant as B compares a kept A run against B: a B run, made as KSampler's adapter
    makes it (graphs_off: graphs do not apply, which would release kept graphs), neither releases, replaces nor
    replays the graphs the A runs keep (graphs stood in: tests/graph_stand_ins.py)."""
    from graph_stand_ins import EagerGraphs
    from xportrait_core.fast import cuda_graphs
    from xportrait_core.fast.kept_graphs import KeptWindowGraphs
    from xportrait_core.sampling.video_denoiser import BranchInput, VideoDenoiser

    monkeypatch.setattr(cuda_graphs, "GuidanceGraphs", EagerGraphs)
    monkeypatch.delenv("XPORTRAIT_CUDA_GRAPHS", raising=False)
    EagerGraphs.made.clear()
    bench = _bench_module("bench_comfy")
    g = torch.Generator().manual_seed(0)
    h = tiny_model.config.image_size // 8
    x, reference = torch.randn(4, 4, h, h, generator=g), torch.randn(1, 4, h, h, generator=g)
    hint = torch.rand(4, 3, h * 8, h * 8, generator=g) * 2 - 1
    context = torch.randn(1, 77, tiny_model.config.unet.context_dim, generator=g)

    def run(kept, steps):
        denoiser = VideoDenoiser(tiny_model, reference, global_hint=hint, local_hint=hint, seed=1,
                                 timesteps=list(range(900, 900 - 10 * steps, -10)),
                                 cuda_graphs=cuda_graphs.cuda_graphs_enabled(), kept_graphs=kept)
        denoiser(900, [BranchInput(x, True, context)])
        denoiser.release()

    kept = KeptWindowGraphs()
    run(kept, 30)
    graphs = kept.graphs
    with bench.apply_variant(variant):
        run(kept, 30)
        run(kept, 6)
    assert kept.graphs is graphs and kept.recordings == 1 and kept.served_again == 0
    assert not EagerGraphs.made[0].released
    run(kept, 6)  # an A run after them: served the kept graphs
    assert kept.served_again == 1


def test_comfy_benchmarks_identical_variant_changes_nothing():
    bench = _bench_module("bench_comfy")
    assert bench.variant_name("identical") == "identical"
    with bench.apply_variant("identical"):
        pass


def test_comfy_benchmarks_kernel_variants_never_reach_the_a_runs_kept_graphs(tiny_model):
    """A kernel variant's B run (here layer_norm) gets no kept graphs: the A runs' were recorded with A's kernels,
    which it would otherwise replay. `identical` keeps them, as A does."""
    from xportrait_core.fast.kept_graphs import KeptWindowGraphs
    from xportrait_core.sampling.video_denoiser import VideoDenoiser

    bench = _bench_module("bench_comfy")
    reference, kept = torch.zeros(1, 4, 8, 8), KeptWindowGraphs()
    with bench.apply_variant("layer_norm"):
        assert VideoDenoiser(tiny_model, reference, cuda_graphs=True, kept_graphs=kept).kept_graphs is None
    with bench.apply_variant("identical"):
        assert VideoDenoiser(tiny_model, reference, cuda_graphs=True, kept_graphs=kept).kept_graphs is kept


def test_comfy_benchmarks_attribute_kernels_to_the_operator_shapes_and_pack_line_that_launched_them():
    """bench_comfy.py --profile-sources: the unvectorised elementwise kernels counted by the innermost operator and
    its callers, its shapes and the first pack line on its stack, the largest device time first."""
    from types import SimpleNamespace as Event

    bench = _bench_module("bench_comfy")
    kernel = lambda name, us: Event(name=name, duration=us)  # noqa: E731
    module = Event(name="aten::reshape", cpu_parent=None)
    clone = Event(name="aten::clone", cpu_parent=module)
    stack = ["/opt/comfy/samplers.py(10): f", "/repo/xportrait_core/model/temporal.py(104): forward"]
    events = [
        Event(name="aten::copy_", cpu_parent=clone, input_shapes=[[8, 16, 320]], stack=stack,
              kernels=[kernel("void at::native::elementwise_kernel<128, 4, copy>", 30.0)]),
        Event(name="aten::copy_", cpu_parent=clone, input_shapes=[[8, 16, 320]], stack=stack,
              kernels=[kernel("void at::native::elementwise_kernel<128, 4, copy>", 20.0)]),
        Event(name="aten::add", cpu_parent=None, input_shapes=[[2, 4], [4]], stack=["/opt/comfy/k.py(3): g"],
              kernels=[kernel("void at::native::elementwise_kernel<128, 4, add>", 10.0),
                       kernel("void at::native::vectorized_elementwise_kernel<8, add>", 99.0)]),
        Event(name="aten::mm", cpu_parent=None, input_shapes=[], stack=[], kernels=[kernel("nvjet_gemm", 500.0)]),
    ]
    table = bench.kernel_sources(events, "native::elementwise_kernel<").splitlines()
    assert len(table) == 3
    assert table[1].split()[:2] == ["2", "0.05"] and "aten::copy_ < aten::clone < aten::reshape" in table[1]
    assert "[[8, 16, 320]]" in table[1] and "temporal.py(104)" in table[1]
    assert table[2].split()[:2] == ["1", "0.01"] and "aten::add" in table[2] and "/opt/comfy/k.py(3)" in table[2]


def test_comfy_benchmarks_sampler_graph_variants_restore_the_rules_they_change():
    """bench_comfy.py --ab sampler_eager_under_async / recorded_reference_net: B keeps our Sampler eager under
    ComfyUI's allocator, or makes graphs record the reference net instead of reading the batched banks; A's rules
    come back, also after a B run that failed."""
    from xportrait_core.sampling import pipeline
    from xportrait_core.sampling.batched_banks import BatchedReferenceBanks

    bench = _bench_module("bench_comfy")
    rules, stored = pipeline.sampler_graph_rules, BatchedReferenceBanks.stored
    with bench.apply_variant("sampler_eager_under_async+recorded_reference_net"):
        assert pipeline.sampler_graph_rules(31) == dict(steps=31, cuda_malloc_async=False)
        assert BatchedReferenceBanks.stored is None
    assert pipeline.sampler_graph_rules is rules and BatchedReferenceBanks.stored is stored
    with pytest.raises(RuntimeError):
        with bench.apply_variant("recorded_reference_net"):
            raise RuntimeError("a B run failed")
    assert BatchedReferenceBanks.stored is stored


def test_comfy_benchmarks_comfy_vae_variant_decodes_through_comfyui_s_network_and_back():
    bench = _bench_module("bench_comfy")
    assert not bench.COMFY_VAE_NETWORK["on"]
    with bench.apply_variant("comfy_vae"):
        assert bench.COMFY_VAE_NETWORK["on"]
    assert not bench.COMFY_VAE_NETWORK["on"]
    with pytest.raises(RuntimeError):
        with bench.apply_variant("comfy_vae+keep_graphs_off"):
            raise RuntimeError("a B run failed")
    assert not bench.COMFY_VAE_NETWORK["on"]
