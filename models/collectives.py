"""Collectives that are no-ops in one process.

Every helper checks ``torch.distributed`` first and only communicates when a process group is initialised
with more than one rank, so the methods run unchanged in a single CPU process (tests, the demo) and under
DDP. There is no unconditional collective anywhere in ``models``: a rank that calls one of these while the
others do not would hang, so callers must reach them on every rank or on none.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks, in place; returns it for chaining. Identity in one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Element-wise maximum of ``tensor`` over ranks, in place; returns it. Identity in one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


@torch.no_grad()
def all_gather_cat(tensor: Tensor) -> Tensor:
    """(n, ...) per rank → (world_size * n, ...) in rank order, without gradient.

    Every rank must pass the same ``n`` (the collective needs equal shapes). Returns ``tensor`` itself in
    one process.
    """
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def gather_cat(tensor: Tensor, dst: int = 0) -> Tensor | None:
    """(n, ...) per rank → (world_size * n, ...) in rank order on rank ``dst`` only, without gradient; the
    other ranks get None and keep no copy (unlike ``all_gather_cat``, whose result every rank holds).

    Every rank must pass the same ``n``. Returns ``tensor`` itself in one process.
    """
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    if rank() != dst:
        dist.gather(tensor, None, dst=dst)
        return None
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.gather(tensor, gathered, dst=dst)
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s values, in place; returns it. Identity in
    one process. Every rank must pass a tensor of the same shape and dtype."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor
