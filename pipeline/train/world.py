"""The process layout of a run: rank, world size and device, as torchrun (or Slurm's srun) describes them.

A plain ``python``/``clusterssl`` process is rank 0 of a world of 1 and never touches
torch.distributed; under ``torchrun`` or one ``srun`` task per rank the process group is created here
(NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from clusterssl.errors import PipelineError
from clusterssl.pipeline.train.slurm import is_slurm_step, slurm_layout

T = TypeVar("T")

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class DistributedEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    """Where rank 0 listens, when it is not torchrun's MASTER_ADDR/MASTER_PORT (a Slurm step)."""
    master_port: int | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> DistributedEnv:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else Slurm's task variables (absent: a single
        process)."""
        if is_slurm_step(os.environ):
            layout = slurm_layout(os.environ)
            return cls(
                layout.rank, layout.world_size, layout.local_rank, layout.master_addr, layout.master_port
            )
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
    if env.master_addr is None:  # torchrun: env:// reads its variables
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        return
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )


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


def waiting_group(env: DistributedEnv, timeout_s: float) -> Any:
    """A CPU (gloo) group with its own timeout, for ranks that wait while rank 0 works alone.

    Rank-0-only work (conversion, clustering, evaluation) can outlast the default group's timeout, which
    is sized for one training step; the waiting ranks block here instead, without occupying a GPU stream.
    A collective: every rank must call it. None for a single process.
    """
    if not env.is_distributed or not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def on_rank0(env: DistributedEnv, work: Callable[[], T], group: Any = None, what: str = "work") -> T:
    """Run ``work`` on rank 0 only and hand its (picklable) result to every rank.

    The other ranks wait in the broadcast. When rank 0 fails, they stop with one line naming ``what``
    rather than waiting for a result that never comes; rank 0 raises its own error.
    """
    if not env.is_distributed or not dist.is_initialized():
        return work()
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if env.is_main:
        try:
            payload[0] = ("ok", work())
        except BaseException as error:  # told to the other ranks, then raised here
            failure = error
            payload[0] = ("failed", str(error).splitlines()[0] if str(error) else type(error).__name__)
    dist.broadcast_object_list(payload, src=0, group=group)
    if failure is not None:
        raise failure
    status, value = payload[0]
    if status == "failed":
        raise PipelineError(f"rank 0 failed during {what}: {value}")
    return value


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
