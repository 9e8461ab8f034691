"""Windows spread over processes (sampling/distributed.py): gloo on CPU processes gives one process's latents.

The processes are started with torch.multiprocessing (spawn) on 127.0.0.1 at a free port, as torchrun would start
them; each loads the tiny model from the golden weights and samples a 20-frame video whose windows do not divide
evenly among the ranks. The command line runs under torchrun itself (2 processes), and with a rank that fails.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from xportrait_core.sampling.distributed import Ranks, idle_ranks_note, window_share
from xportrait_core.sampling.windows import windows_per_step

FRAMES = 20
RESOLUTION = 64
STEPS = 2
# (window, overlap) -> windows a step for 20 frames: (6, 2) -> 5, split 3+2 on two ranks and 2+2+1 on three;
# (16, 4) -> 2: fewer windows than three ranks, so one rank has none; (6, 4) -> 8, split 3+3+2 on three ranks,
# with up to three windows over a frame.
PLANS = ((6, 2), (16, 4), (6, 4))
# Where at most two windows cover a frame the sums are the same two floats added (bit-identical, measured and
# asserted); where three do, the ranks' partial sums are added in another order. Measured: 4.8e-7 at most, on
# latents up to 7 in magnitude, with two and three processes.
EXACT_PLANS = ("6_2", "16_4")
TOLERANCE = 2e-6
TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    generator = torch.Generator().manual_seed(3)
    hints = torch.rand(2, FRAMES, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
    reference = torch.rand(RESOLUTION, RESOLUTION, 3, generator=generator)
    return reference, hints[0], hints[1]


def _sample(model, window: int, overlap: int) -> torch.Tensor:
    from xportrait_core.sampling.pipeline import animate_latents

    reference, global_hint, local_hint = _inputs()
    context = torch.zeros(1, model.config.text_encoder.max_length, model.config.unet.context_dim)
    return animate_latents(model, reference, global_hint=global_hint, local_hint=local_hint, steps=STEPS,
                           guidance_scale=5.0, window=window, overlap=overlap, seed=11, context=context,
                           uncond_context=context)


def _load_tiny(weights: str):
    from xportrait_core.model.checkpoint import load_xportrait
    from xportrait_core.model.config import XPortraitConfig

    return load_xportrait(weights, XPortraitConfig.tiny(), dtype=torch.float32, device="cpu").eval()


def _rank_main(rank: int, world_size: int, port: int, weights: str, out_dir: str) -> None:
    """One rank: join the group, sample every plan inside the spread, save its latents (rank 0)."""
    torch.set_num_threads(1)
    from xportrait_core.sampling import distributed
    from xportrait_core.sampling.windows import spreading_windows

    ranks = Ranks(rank, world_size)
    distributed.start(ranks, torch.device("cpu"), timeout_s=TIMEOUT_S, init_method=f"tcp://127.0.0.1:{port}")
    model = _load_tiny(weights)
    with spreading_windows(distributed.SpreadWindows(ranks)):
        results = {f"{w}_{o}": _sample(model, w, o) for w, o in PLANS}
    if rank == 0:
        torch.save(results, Path(out_dir, f"latents_{world_size}.pt"))
    distributed.stop()


def _spawn(world_size: int, weights: Path, out_dir: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(world_size, _free_port(), str(weights), str(out_dir)),
             nprocs=world_size, join=True)


def test_window_share_is_balanced_and_covers_every_window():
    for num in range(0, 12):
        for world in range(1, 6):
            shares = [window_share(num, world, rank) for rank in range(world)]
            assert [i for share in shares for i in share] == list(range(num))  # consecutive, each once, in order
            sizes = [len(share) for share in shares]
            assert max(sizes) - min(sizes) <= 1
    assert [len(window_share(5, 2, r)) for r in range(2)] == [3, 2]
    assert [len(window_share(5, 3, r)) for r in range(3)] == [2, 2, 1]
    assert [len(window_share(2, 3, r)) for r in range(3)] == [1, 1, 0]


def test_idle_ranks_are_named():
    assert idle_ranks_note(5, 3) is None
    note = idle_ranks_note(2, 3)
    assert "2 windows for 3 processes" in note and "ranks 2..2" in note


def test_ranks_from_torchrun_environment():
    assert Ranks.from_environment({}) is None
    assert Ranks.from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    ranks = Ranks.from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.is_first) == (3, 4, 1, False)


def test_plans_split_unevenly():
    assert [windows_per_step(FRAMES, w, o) for w, o in PLANS] == [5, 2, 8]


def test_two_and_three_processes_give_one_process_latents(tiny_model, golden_state_dict_path, tmp_path):
    single = {f"{w}_{o}": _sample(tiny_model, w, o) for w, o in PLANS}
    for world_size in (2, 3):
        _spawn(world_size, golden_state_dict_path, tmp_path)
        spread = torch.load(tmp_path / f"latents_{world_size}.pt", weights_only=True)
        for plan, expected in single.items():
            assert spread[plan].shape == expected.shape == (FRAMES, 4, RESOLUTION // 8, RESOLUTION // 8)
            difference = (spread[plan] - expected).abs().max().item()
            assert difference <= TOLERANCE, (world_size, plan, difference)
            if plan in EXACT_PLANS:
                assert torch.equal(spread[plan], expected), (world_size, plan, difference)
    # Not a vacuous comparison: the plans differ from each other, and from the starting noise.
    assert (single["6_2"] - single["16_4"]).abs().max() > 1e-3


# ---- the command line under torchrun ----------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
# 12 driving frames in windows of 6 overlapping by 2: 3 windows a step, 2 + 1 on two processes. The mp4 is lossless
# (--crf 0): lossy H.264 turns a one-level difference of a pixel into other encoder decisions, up to 25 levels on
# a 2-core CI machine, which would hide whether the frames themselves agree.
DEMO_ARGS = ["--frames", "12", "--window", "6", "--overlap", "2", "--steps", "1", "--decode-chunk", "2", "--fps", "10",
             "--crf", "0"]


def _demo_args(out: Path, weights: Path, reference: Path, driving: Path) -> list[str]:
    return ["demo", "-o", str(out), "--weights", str(weights), "--reference", str(reference),
            "--driving", str(driving), *DEMO_ARGS]


def test_torchrun_demo_writes_the_frames_of_one_process(tmp_path, golden_state_dict_path, source_image_path,
                                                        driving_video_path):
    import subprocess
    import sys

    from xportrait_core.media.video_io import read_video

    # Both runs in fresh processes of the same environment, as a user starts them.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.mp4", tmp_path / "two.mp4"
    single = subprocess.run([sys.executable, "-m", "xportrait_core",
                             *_demo_args(one, golden_state_dict_path, source_image_path, driving_video_path)],
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "xportrait_core",
                           *_demo_args(two, golden_state_dict_path, source_image_path, driving_video_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("wrote ") == 2  # the video and the strip, written once (rank 0)
    assert "2 processes (gloo)" in done.stderr and done.stderr.count("sampling   [") >= 1
    frames_one, frames_two = read_video(one)[0], read_video(two)[0]
    assert frames_two.shape == frames_one.shape == (12, 64, 64, 3)
    # The latents agree to float summation order, far below one level of 8-bit colour: the same frames.
    assert abs(frames_one.astype(int) - frames_two.astype(int)).max() <= 1


def _cli_rank_main(rank: int, world_size: int, port: int, argv: list, out_dir: str) -> None:
    """One torchrun-like process of `python -m xportrait_core demo`, whose rank 1 fails in its first window."""
    import contextlib

    from xportrait_core import cli
    from xportrait_core.sampling.guidance import GuidedDenoiser

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if rank == 1:
        def broken(self, x, t, frame_indices):
            raise RuntimeError("injected failure")

        GuidedDenoiser.__call__ = broken
    with open(Path(out_dir, f"stderr_{rank}.txt"), "w") as err, contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except Exception:  # noqa: BLE001 - main printed the rank's line; the traceback is not under test
            code = "raised"
    Path(out_dir, f"code_{rank}.txt").write_text(str(code))


def test_a_failing_rank_of_the_command_line_is_named(tmp_path, golden_state_dict_path, source_image_path,
                                                      driving_video_path):
    argv = _demo_args(tmp_path / "out.mp4", golden_state_dict_path, source_image_path, driving_video_path)
    argv += ["--rank-timeout", str(TIMEOUT_S)]
    began = time.monotonic()
    mp.spawn(_cli_rank_main, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    assert time.monotonic() - began < TIMEOUT_S + 30
    errors = [Path(tmp_path, f"stderr_{rank}.txt").read_text() for rank in range(2)]
    assert "error: rank 1 of 2: failed: RuntimeError: injected failure" in errors[1]
    assert Path(tmp_path, "code_1.txt").read_text() == "raised"
    assert "error: rank 0 stopped while adding up a step's windows: another rank failed" in errors[0]
    assert Path(tmp_path, "code_0.txt").read_text() == "1"
    assert not (tmp_path / "out.mp4").exists()
