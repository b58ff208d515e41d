"""Turning a method's tensor metrics into the ``dict[str, float]`` that ``LossOutput.metrics`` holds."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


@torch.no_grad()
def to_floats(metrics: Mapping[str, Tensor]) -> dict[str, float]:
    """0-dim (or one-element) tensors → Python floats with one device-to-host copy for all of them.

    Calling ``.item()`` per metric would synchronise the GPU once per metric every step.
    """
    if not metrics:
        return {}
    stacked = torch.stack([value.detach().float().reshape(()) for value in metrics.values()])
    return dict(zip(metrics, stacked.tolist(), strict=True))
