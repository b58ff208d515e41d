"""A method's metrics as ``LossOutput.metrics`` holds them: detached 0-dim float tensors on the device."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


@torch.no_grad()
def scalar_metrics(metrics: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """0-dim (or one-element) tensors → detached 0-dim float32 tensors, left on their device.

    Nothing is read back to the host here: converting to Python floats every step would make the CPU
    wait for the GPU to finish the step. The trainer sums them on the device and reads the sums once per
    logging interval.
    """
    return {name: value.detach().float().reshape(()) for name, value in metrics.items()}
