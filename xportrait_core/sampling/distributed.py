"""One video, several processes: each step's windows spread over the ranks of a torch.distributed job.

The windows of one step are independent: each step's eps is, frame by frame, the average of the windows covering
it. So every rank holds the whole model and the same latents, draws the same window offsets from the same seed,
denoises its share of the step's windows (`window_share`), and one all-reduce of the per-frame sums and counts
(`windows.WindowTotals`, one flat buffer) gives every rank the average one process would have computed, up to the
order in which floats are added. The DDIM step that follows is the same on every rank, so the latents stay equal.

The spread lives in `windows.windowed_eps`, the window evaluation every sampler shares: a sampler run inside
`windows.spreading_windows(SpreadWindows(...))` is spread without knowing it.

The command line starts it under torchrun (cli.py): `Ranks.from_environment` reads torchrun's variables, `start`
joins the process group (NCCL on GPUs, gloo on CPUs) with a timeout, so that a rank that dies or hangs makes the
others fail instead of waiting forever. `RankLost` is what a collective raises when another rank has gone.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional, Sequence

import torch

from .windows import WindowTotals

# How long a rank waits in a collective before giving up (seconds): long enough for rank 0 to read the driving
# video and find its faces while the others wait for the hints.
DEFAULT_TIMEOUT_S = 1800


class RankLost(RuntimeError):
    """A collective failed: another rank of the job stopped (its own error names it) or did not answer in time."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank (0 reads inputs and writes outputs), world_size, and local_rank (the
    GPU of this host it uses)."""

    rank: int
    world_size: int
    local_rank: int = 0

    @classmethod
    def from_environment(cls, environ=None) -> Optional["Ranks"]:
        """The job torchrun started this process in (RANK, WORLD_SIZE, LOCAL_RANK), or None when there is none or
        it has one process."""
        environ = os.environ if environ is None else environ
        world_size = int(environ.get("WORLD_SIZE", "1") or 1)
        if world_size <= 1:
            return None
        rank = int(environ["RANK"])
        return cls(rank, world_size, int(environ.get("LOCAL_RANK", rank)))

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(ranks: Ranks, device: torch.device) -> torch.device:
    """The device of this rank: its own GPU (by local rank) where the job runs on CUDA, else `device`."""
    if device.type != "cuda":
        return device
    if device.index is not None and device.index != 0:
        raise ValueError(f"--device {device} with several processes: each process takes the GPU of its local rank; "
                         "use --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    if ranks.local_rank >= count:
        raise ValueError(f"{ranks.label} needs GPU {ranks.local_rank} of this host, which has {count}: start at most "
                         f"{count} processes per host (torchrun --nproc-per-node)")
    return torch.device("cuda", ranks.local_rank)


def start(ranks: Ranks, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S,
          init_method: Optional[str] = None) -> torch.device:
    """Join the job's process group (torchrun's rendezvous unless `init_method`); returns this rank's device."""
    import torch.distributed as dist

    device = rank_device(ranks, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # device_id binds NCCL's communicator to this rank's GPU at once (no guessing the device at the first barrier).
    dist.init_process_group(backend_for(device), init_method=init_method or "env://", rank=ranks.rank,
                            world_size=ranks.world_size, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return device


def stop() -> None:
    """Leave the process group (after the job's last collective)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def window_share(num_items: int, world_size: int, rank: int) -> range:
    """The items (windows, or frames to decode) of `rank`: consecutive, and no rank has more than one item more
    than another, so no rank waits for more than one window call a step. Ranks past `num_items` get none."""
    base, extra = divmod(num_items, world_size)
    begin = rank * base + min(rank, extra)
    return range(begin, begin + base + (1 if rank < extra else 0))


def idle_ranks_note(num_windows: int, world_size: int) -> Optional[str]:
    """What to tell the user when a step has fewer windows than there are ranks; None otherwise."""
    if num_windows >= world_size:
        return None
    return (f"each step has {num_windows} window{'s' if num_windows != 1 else ''} for {world_size} processes: "
            f"ranks {num_windows}..{world_size - 1} have none and only join the sums (use at most {num_windows} "
            "processes, or a longer video)")


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turns a failed collective into `RankLost`, which says what this rank was doing."""
    import torch.distributed as dist

    try:
        yield
    except RankLost:
        raise
    except (RuntimeError, dist.DistError) as error:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise RankLost(f"rank {rank} stopped while {what}: another rank failed (its error names it) or did not "
                       f"answer within the timeout ({error})") from error


class SpreadWindows:
    """`windows.WindowSpread` over the default process group: a rank's share of each step's windows, one all-reduce
    of the sums and counts, and rank 0's copy of the inputs every rank must agree on."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    def share(self, windows: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        mine = window_share(len(windows), self.ranks.world_size, self.ranks.rank)
        return list(windows[mine.start:mine.stop])

    def combine(self, totals: Optional[WindowTotals], returns_tuple: bool, x: torch.Tensor,
                num_windows: int) -> tuple[WindowTotals, bool]:
        import torch.distributed as dist

        with _collective("adding up a step's windows"):
            if num_windows < self.ranks.world_size:
                # Some ranks ran no window, so do not know how many eps parts the denoiser returns: those who do
                # tell them (a second, tiny collective only in this case).
                header = torch.tensor([0, 0] if totals is None else [len(totals.sums), int(returns_tuple)],
                                      dtype=torch.int64, device=x.device)
                dist.all_reduce(header, op=dist.ReduceOp.MAX)
                num_parts, returns_tuple = int(header[0]), bool(header[1])
                if totals is None:
                    totals = WindowTotals(x, num_parts)
            dist.all_reduce(totals.buffer)
        return totals, returns_tuple

    def same_everywhere(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        tensor = tensor.contiguous()
        with _collective("receiving the starting latents"):
            dist.broadcast(tensor, src=0)
        return tensor


# ---- inputs from rank 0, frames to rank 0 -----------------------------------------------------------------------


def broadcast_object(value, device: torch.device):
    """A small picklable value (sizes, fps, notes) from rank 0 to every rank; others pass anything."""
    import torch.distributed as dist

    box = [value]
    with _collective("sharing rank 0's inputs"):
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def broadcast_tensor(tensor: Optional[torch.Tensor], device: torch.device, chunk_frames: int = 64) -> torch.Tensor:
    """A CPU tensor (frames first) from rank 0 to every rank's CPU; others pass None. Sent `chunk_frames` frames at
    a time through `device` (NCCL needs GPU tensors), so a long video's hints never sit whole on the GPU."""
    import torch.distributed as dist

    meta = broadcast_object(None if tensor is None else (tuple(tensor.shape), tensor.dtype), device)
    shape, dtype = meta
    result = tensor if tensor is not None else torch.empty(shape, dtype=dtype)
    with _collective("sharing rank 0's inputs"):
        for begin in range(0, shape[0], chunk_frames):
            part = result[begin:begin + chunk_frames]
            moving = part.to(device).contiguous()
            dist.broadcast(moving, src=0)
            if tensor is None:
                part.copy_(moving)
    return result


def send_to_first(frames: torch.Tensor, device: torch.device) -> None:
    """This rank's decoded frames (uint8, CPU) to rank 0, which takes them with `receive_from`."""
    import torch.distributed as dist

    with _collective("sending decoded frames to rank 0"):
        dist.send(frames.to(device).contiguous(), dst=0)
        if device.type == "cuda":
            # NCCL returns once the send is queued; this rank leaves the group right after.
            torch.cuda.synchronize(device)


def receive_from(rank: int, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Rank `rank`'s decoded frames (uint8, `shape`), on rank 0's CPU."""
    import torch.distributed as dist

    frames = torch.empty(tuple(shape), dtype=torch.uint8, device=device)
    with _collective(f"receiving rank {rank}'s decoded frames"):
        dist.recv(frames, src=rank)
    return frames.cpu()
