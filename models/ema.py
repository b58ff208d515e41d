"""Exponential moving average of one module's weights into another (DINO's teacher, PCL's key encoder)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float, *, copy_buffers: bool = True) -> None:
    """``target ← momentum · target + (1 − momentum) · source`` for every parameter, in place.

    ``target`` and ``source`` must have the same architecture (``target`` usually a deep copy). With
    ``copy_buffers`` the buffers (BatchNorm running statistics) are copied from ``source``; without, the
    target keeps its own, updated by its own forward passes in train mode (what DINO's teacher does).
    The update is two fused multi-tensor ops (``_foreach_mul_``/``_foreach_add_``, as torch.optim uses),
    the same arithmetic as the original ``p_t.mul_(m).add_((1 - m) * p_s)``.
    """
    target_params = list(target.parameters())
    source_params = list(source.parameters())
    if len(target_params) != len(source_params):
        raise ValueError(
            f"EMA between different architectures: {len(target_params)} vs {len(source_params)} parameters"
        )
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, [p.detach() for p in source_params], alpha=1.0 - momentum)
    if copy_buffers:
        for target_buffer, source_buffer in zip(target.buffers(), source.buffers(), strict=True):
            target_buffer.copy_(source_buffer)
