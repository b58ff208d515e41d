"""The EMA teacher: frozen copies of student modules that follow the student by an exponential moving
average of its weights (DINO's teacher, PCL's momentum encoder; iBOT's teacher is built the same way).

A method makes the copies with ``frozen_copy`` and registers them under its own attribute names, so that
the checkpoint keys are the method's (``teacher_backbone.…``, ``key_encoder.…``); after every optimizer
step it calls ``ema_update_`` with the teacher and the student, each given as one module or as a sequence
of modules whose parameters line up.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)
Modules = nn.Module | Sequence[nn.Module]


def frozen_copy(module: ModuleT) -> ModuleT:
    """A deep copy of ``module`` whose parameters get no gradient: the teacher's starting point."""
    return copy.deepcopy(module).requires_grad_(False)


def _as_list(modules: Modules) -> list[nn.Module]:
    return [modules] if isinstance(modules, nn.Module) else list(modules)


@torch.no_grad()
def ema_update_(target: Modules, source: Modules, momentum: float, *, copy_buffers: bool = True) -> None:
    """``target ← momentum · target + (1 − momentum) · source`` for every parameter, in place.

    ``target`` and ``source`` are modules (or sequences of modules, taken in order) with the same
    architecture, ``target`` usually made by ``frozen_copy``. With ``copy_buffers`` the buffers (BatchNorm
    running statistics) are copied from ``source``; without, the target keeps its own, updated by its own
    forward passes in train mode (what DINO's teacher and MoCo's key encoder do). The update is two fused
    multi-tensor ops over all parameters (``_foreach_mul_``/``_foreach_add_``, as torch.optim uses), the
    same arithmetic as the original ``p_t.mul_(m).add_((1 - m) * p_s)``.
    """
    targets, sources = _as_list(target), _as_list(source)
    target_params = [p for module in targets for p in module.parameters()]
    source_params = [p for module in sources for p in module.parameters()]
    if len(target_params) != len(source_params):
        raise ValueError(
            f"EMA between different architectures: {len(target_params)} vs {len(source_params)} parameters"
        )
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, [p.detach() for p in source_params], alpha=1.0 - momentum)
    if copy_buffers:
        target_buffers = [b for module in targets for b in module.buffers()]
        source_buffers = [b for module in sources for b in module.buffers()]
        for target_buffer, source_buffer in zip(target_buffers, source_buffers, strict=True):
            target_buffer.copy_(source_buffer)
