"""The CUDA settings a training run wants and PyTorch leaves off by default.

- ``cudnn.benchmark``: the input shapes of a run are fixed (global and local crops), so timing the
  convolution algorithms once per shape pays back from the first few steps on.
- TF32 for float32 matmuls and convolutions: what is left in float32 under bf16 autocast (the float32
  logits, the optimizer's own maths) runs on the tensor cores at 10 mantissa bits, well inside what those
  steps need.
- channels_last for convolutional backbones: the layout cuDNN's tensor-core kernels use natively, without
  a transpose before and after every convolution. (Inputs in the other layout are converted by the first
  convolution.)

Nothing changes for CPU runs.
"""

from __future__ import annotations

import torch
from torch import nn


def configure_cuda(device: torch.device) -> None:
    """Process-wide cuDNN and TF32 switches, for a run on ``device`` (a no-op off CUDA)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def to_device_layout(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` on ``device``, with 4-D weights in channels_last on CUDA when it has convolutions."""
    module = module.to(device)
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in module.modules()):
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module
