"""Per-step schedules: cosine, linear warm-up then cosine, and DINO's linear teacher-temperature warm-up.

Plain functions of the step (no state), so a resumed run computes the same value as an uninterrupted one
and the trainer can reuse them for the learning rate and the weight decay.
"""

from __future__ import annotations

import math


def cosine_schedule(start: float, end: float, step: int, total_steps: int) -> float:
    """Half a cosine from ``start`` (step 0) towards ``end`` (reached at ``step == total_steps``).

    ``end + (start - end) · (1 + cos(π · step / total_steps)) / 2``; steps past ``total_steps`` stay at
    ``end``. This is DINO's ``cosine_scheduler`` without warm-up (its last iteration, total_steps - 1, is
    just short of ``end``).
    """
    if total_steps <= 0:
        return end
    progress = min(max(step, 0), total_steps) / total_steps
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    base: float,
    end: float,
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then a cosine to ``end``.

    During warm-up the value is ``warmup_start + (base - warmup_start) · step / warmup_steps`` (so ``base``
    is first reached at ``step == warmup_steps``); afterwards ``cosine_schedule(base, end, step -
    warmup_steps, total_steps - warmup_steps)``. Used for the learning rate (warm-up from 0) and, without
    warm-up, for DINO's weight decay (0.04 → 0.4).
    """
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    return cosine_schedule(base, end, step - warmup_steps, total_steps - warmup_steps)


def linear_warmup(start: float, end: float, epoch: int, warmup_epochs: int) -> float:
    """``start`` at epoch 0 rising linearly to ``end`` at epoch ``warmup_epochs - 1``, then ``end``
    (a one-epoch warm-up is ``start`` in epoch 0; no warm-up is ``end`` throughout).

    The same values as DINO's ``np.linspace(start, end, warmup_epochs)`` followed by constant ``end``
    (the teacher-temperature schedule: 0.04 → 0.07 over 30 epochs).
    """
    if epoch >= warmup_epochs:
        return end
    if warmup_epochs == 1:  # np.linspace(start, end, 1) is [start]: one warm-up epoch at ``start``
        return start
    return start + (end - start) * max(epoch, 0) / (warmup_epochs - 1)
