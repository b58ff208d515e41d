"""Numeric precision of a run: which one ``auto`` means on a device, and the autocast context for it.

One place for the rule that the trainer, the extraction pass and the training benchmark share:
``auto`` is bf16 on a GPU (no loss scaling needed, unlike fp16) and fp32 on a CPU (CPU autocast is slower
than fp32 for convolutions on most machines).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from clusterssl.errors import PipelineError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` on CUDA, ``fp32`` elsewhere; other names are returned as they are."""
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for a resolved precision: none for fp32, bf16/fp16 autocast otherwise."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()
