"""The process layout of a run: rank, world size and device, as torchrun describes them.

A plain ``python``/``clusterssl`` process is rank 0 of a world of 1 and never touches
torch.distributed; under ``torchrun`` the process group is created here (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from clusterssl.errors import PipelineError

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class DistributedEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> DistributedEnv:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent: a single process)."""
        try:
            return cls(
                rank=int(os.environ.get("RANK", 0)),
                world_size=int(os.environ.get("WORLD_SIZE", 1)),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            )
        except ValueError as error:
            raise PipelineError(f"malformed torchrun environment: {error}") from None


def resolve_device(name: str, env: DistributedEnv) -> torch.device:
    """``auto`` → this rank's GPU when CUDA works, else the CPU; ``cpu``/``cuda`` force one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(
                "device 'cuda' was asked for but CUDA is not available; use --set trainer.device=cpu"
            )
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise PipelineError(f"unknown device {name!r}; known: auto, cpu, cuda")


def init_distributed(env: DistributedEnv, device: torch.device, timeout_s: float = 1800) -> None:
    """Create the process group once when running under torchrun with more than one process."""
    if not env.is_distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def barrier(env: DistributedEnv) -> None:
    if env.is_distributed and dist.is_initialized():
        dist.barrier()


def same_on_all_ranks(env: DistributedEnv, values: Sequence[int], device: torch.device) -> bool:
    """Whether every rank passed the same integers (always True for a single process).

    A collective: every rank must call it, with the same number of values.
    """
    if not env.is_distributed or not dist.is_initialized():
        return True
    low = torch.tensor(list(values), dtype=torch.int64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def follow_main_rank(env: DistributedEnv, flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (the others' own flags are ignored); a plain process keeps its own.

    A collective: every rank must call it.
    """
    if not env.is_distributed or not dist.is_initialized():
        return flag
    shared = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.broadcast(shared, src=0)
    return bool(shared.item())


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_distributed(
    method: ModuleT, env: DistributedEnv, device: torch.device, *, sync_batchnorm: bool
) -> tuple[ModuleT, nn.Module]:
    """(method, the module the steps call): the method itself in one process; under DDP the method
    (with SyncBatchNorm layers if asked) and its DistributedDataParallel wrapper."""
    if not env.is_distributed:
        return method, method
    if sync_batchnorm:
        if device.type != "cuda":
            raise PipelineError(
                "model.sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm does not run on CPUs)"
            )
        method = cast(ModuleT, nn.SyncBatchNorm.convert_sync_batchnorm(method))
    # Queues and centres are per rank or all-reduced by the method itself: never broadcast buffers.
    device_ids = [device.index] if device.type == "cuda" else None
    return method, nn.parallel.DistributedDataParallel(method, device_ids=device_ids, broadcast_buffers=False)
