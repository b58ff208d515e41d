"""Real process groups for the distributed tests: gloo on the CPU, spawned processes, a timeout."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@contextmanager
def gloo_process_group(rank: int, init_file: str, world_size: int, timeout_s: float) -> Iterator[None]:
    """Inside a spawned worker: join the gloo group through ``init_file``, one torch thread per rank
    (the machine has few cores for several processes), and leave the group on the way out."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        torch.set_num_threads(1)
        yield
    finally:
        dist.destroy_process_group()


def run_ranks(worker: Callable[..., None], args: Sequence[Any], world_size: int, timeout_s: float) -> None:
    """Spawn ``worker(rank, *args)`` for every rank and wait; a hang is killed and fails the test after
    ``timeout_s`` instead of blocking the suite."""
    context = mp.start_processes(
        worker, args=tuple(args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    os.kill(process.pid, 9)
            pytest.fail(f"distributed workers did not finish within {timeout_s} s")


def load_rank_results(out_dir: Path, world_size: int) -> list[dict[str, Any]]:
    """What each rank saved as ``out_dir/rank{r}.pt``, in rank order."""
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
