"""Similarity logits in float32 under mixed precision.

Logits that a loss divides by a small temperature (SwAV's prototype scores ÷ 0.1, DINO's head output
÷ 0.04, PCL's dot products ÷ 0.2 or φ) lose too much in bfloat16: near 1 its spacing is 2⁻⁷ ≈ 0.008, which
becomes ~0.2 nat after ÷ 0.04. The final matmul is a small part of a step's work, so it runs in float32
whatever autocast says; everything before it keeps the reduced precision.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fp32_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` computed and returned in float32, outside autocast (gradients flow as usual)."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        return a.float() @ b.float()
