"""The values of the steps between two log points, kept on the device until the trainer reads them.

Reading a loss or a metric back to the host (``.item()``, ``float(tensor)``) makes the CPU wait until the
GPU has finished the step, so that the next step cannot be queued behind it. The window keeps every
step's loss, metrics and gradient norm as device tensors and reads them all with one copy when the
trainer logs (every ``trainer.log_every`` steps and at the end of an epoch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


@dataclass
class WindowValues:
    """What a window held, on the host.

    steps/losses: each step's global step (0-based) and loss, in order; ``summary``: the means of the
    window (loss, method metrics, gradient norm) and its throughput, as the trainer logs them.
    """

    epoch: int
    steps: list[int]
    losses: list[float]
    summary: dict[str, float] = field(default_factory=dict)

    def first_nonfinite(self) -> int | None:
        """Position in ``steps`` of the first step whose loss is NaN or infinite, or None."""
        return next((i for i, loss in enumerate(self.losses) if not math.isfinite(loss)), None)


class MetricWindow:
    """Per-step values of one epoch's steps since the last log point."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.steps: list[int] = []
        self.losses: list[Tensor] = []
        self.metrics: list[dict[str, Tensor]] = []
        self.grad_norms: list[Tensor] = []
        self.images = 0
        self.data_time = 0.0
        self.step_time = 0.0

    @property
    def count(self) -> int:
        return len(self.steps)

    def add(
        self,
        step: int,
        loss: Tensor,
        metrics: Mapping[str, Tensor],
        grad_norm: Tensor | None,
        *,
        images: int,
    ) -> None:
        """One step: its 0-dim ``loss``, method ``metrics`` and ``grad_norm`` (device tensors, not read
        here) and the images it trained on (all ranks)."""
        self.steps.append(step)
        self.losses.append(loss.detach())
        self.metrics.append(dict(metrics))
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
        self.images += images

    def add_time(self, *, data_time: float, step_time: float) -> None:
        """Host-side seconds of a step: waiting for its batch, and in all (its batch included). Without
        a read per step they measure the time to queue the work, which evens out over a window."""
        self.data_time += data_time
        self.step_time += step_time

    def read(self) -> WindowValues:
        """All values with one device-to-host copy; the sums and means are taken on the host, in the
        order of the steps."""
        flat = [*self.losses, *(value for step in self.metrics for value in step.values()), *self.grad_norms]
        values = torch.stack([value.float().reshape(()) for value in flat]).tolist() if flat else []
        losses, values = values[: self.count], values[self.count :]
        sums: dict[str, float] = {}
        for step_metrics in self.metrics:
            for key, value in zip(step_metrics, values, strict=False):
                sums[key] = sums.get(key, 0.0) + value
            values = values[len(step_metrics) :]
        result = WindowValues(epoch=self.epoch, steps=list(self.steps), losses=losses)
        if not self.count:
            return result
        result.summary = {
            "loss": sum(losses) / self.count,
            "images_per_s": self.images / self.step_time if self.step_time > 0 else 0.0,
            "data_wait_share": self.data_time / self.step_time if self.step_time > 0 else 0.0,
        }
        result.summary.update({key: total / self.count for key, total in sums.items()})
        if values:  # what is left are the gradient norms
            result.summary["grad_norm"] = float(np.mean(values))
        return result
