"""Data-parallel training across processes started by `torchrun` (torch.distributed).

Each process holds its own quantized copy of the base and its share of every global
micro-batch; DistributedDataParallel averages the adapter gradients. Process 0 alone writes
files, logs and draws the progress bar. Nothing here is used in a single process.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from ..errors import QDyLoRAError


@dataclass(frozen=True)
class Processes:
    """This process's place among `world` processes (world 1: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def from_environment() -> Processes:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; one process without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    return Processes(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def device_for(procs: Processes, requested: str | None) -> str | None:
    """With several processes on CUDA, process i uses cuda:LOCAL_RANK unless a device is named."""
    if procs.distributed and (requested in (None, "cuda")) and torch.cuda.is_available():
        return f"cuda:{procs.local_rank}"
    return requested


def start(procs: Processes, device: torch.device) -> bool:
    """Join the process group: nccl on CUDA, gloo on CPU (torchrun's rendezvous variables).
    True when this call created it (and so should destroy it); False if there is nothing to do."""
    if not procs.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=procs.rank, world_size=procs.world, timeout=timedelta(minutes=60))
    return True


def stop(procs: Processes) -> None:
    if procs.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(procs: Processes) -> None:
    if procs.distributed:
        dist.barrier()


def shard(examples: Sequence, procs: Processes) -> tuple[list, float]:
    """This process's rows of a global micro-batch (rows rank, rank + world, ...) and its weight.

    A short last batch may leave a process without rows: it then runs the first row with
    weight 0, so it still takes part in the gradient all-reduce but adds nothing.
    """
    mine = list(examples[procs.rank::procs.world])
    return (mine, 1.0) if mine else ([examples[0]], 0.0)


def sum_float(procs: Processes, value: float, device: torch.device) -> float:
    """`value` summed over the processes (itself in one process)."""
    if not procs.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    with _released([t]):
        dist.all_reduce(t)
    return float(t.item())


def check_same(procs: Processes, value: int, what: str, device: torch.device) -> None:
    """Raise unless every process holds the same integer `value` (e.g. this step's rank)."""
    if not procs.distributed:
        return
    mine = torch.tensor([value], dtype=torch.long, device=device)
    values = [torch.zeros_like(mine) for _ in range(procs.world)]
    with _released([mine, *values]):
        dist.all_gather(values, mine)
    seen = [int(v.item()) for v in values]
    if len(set(seen)) > 1:
        raise QDyLoRAError(
            f"the processes disagree on {what} ({', '.join(f'process {i}: {v}' for i, v in enumerate(seen))}): "
            "start every process with the same settings and seed")


@contextlib.contextmanager
def _released(tensors: Sequence[torch.Tensor], limit_s: float = 10.0) -> Iterator[None]:
    """Around a collective on `tensors`: return once the backend's worker thread has let go of
    them again (their use counts back to what they were before, when only Python held them).

    Why: gloo runs collectives in worker threads, which drop their references to the tensors
    just after `wait()` returns here. If Python dropped its own first, the worker's release is
    the last one and must take the GIL to free the Python object; should the process group be
    destroyed at that moment (an error raised right after a collective: the main thread holds
    the GIL while ~ProcessGroupGloo joins the worker), both wait forever. Measured in the
    rank-mismatch test under load: one process hung with its main thread in
    ProcessGroupGloo::~ProcessGroupGloo and the worker in ~AsyncAllgatherWork -> decref_pyobject
    (3 of 9 runs of that test hung beside a CPU hog, `yes > /dev/null`; 0 of 20 with this wait).
    Holding the tensors until the worker is done makes its release a plain C++ decrement. The
    counts are compared with their own values before the collective, not with 1 (what a tensor
    only Python holds counts has changed between torch versions). CUDA tensors are not waited
    for: NCCL's watchdog thread may keep finished work for a while, and the hang was gloo's.
    """
    watched = [t for t in tensors if t.device.type == "cpu" and hasattr(t, "_use_count")]
    before = [t._use_count() for t in watched]
    yield
    deadline = time.monotonic() + limit_s
    while any(t._use_count() > n for t, n in zip(watched, before)) and time.monotonic() < deadline:
        time.sleep(1e-4)  # releases the GIL
