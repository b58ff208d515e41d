"""Test doubles for the trainer side of the Method contract.

``FakeContext`` implements ``models.method.TrainContext``; ``optimizer_step`` performs one step in the
order the trainer does (forward, backward, on_after_backward, drop frozen gradients, step, on_step_end),
so method tests can check parameters after a step without the pipeline package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from clusterssl.models.method import Method, TrainContext
from clusterssl.models.types import Batch, FeatureBank, LossOutput

T = TypeVar("T")


@dataclass
class FakeContext:
    """A hand-built run position. ``images`` (N, 3, H, W) and ``labels`` (N,) back ``extract``."""

    epoch: int = 0
    epochs: int = 1
    step: int = 0
    steps_per_epoch: int = 1
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    num_samples: int = 0
    images: Tensor | None = None
    labels: Tensor | None = None
    extract_batch_size: int = 64
    logged: list[dict[str, float]] = field(default_factory=list)
    sample_repeats: list[np.ndarray | None] = field(default_factory=list)
    extracted: list[str] = field(default_factory=list)
    reset_parameters: list[list[nn.Parameter]] = field(default_factory=list)

    @torch.no_grad()
    def extract(self, module: nn.Module, *, name: str) -> FeatureBank:
        """Features of ``images`` in eval mode, row i for sample i (restores the module's mode)."""
        if self.images is None:
            raise AssertionError("FakeContext.extract needs images")
        self.extracted.append(name)
        was_training = module.training
        module.eval()
        try:
            chunks = [module(chunk) for chunk in self.images.split(self.extract_batch_size)]
        finally:
            module.train(was_training)
        labels = None if self.labels is None else self.labels.numpy().astype(np.int64)
        return FeatureBank(features=torch.cat(chunks).float().numpy(), labels=labels)

    def set_sample_repeats(self, repeats: np.ndarray | None) -> None:
        self.sample_repeats.append(repeats)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self.logged.append(dict(metrics))

    def on_rank_zero(self, work: Callable[[], T], *, what: str) -> T:
        """One process: rank 0's work is done here."""
        return work()

    def reset_optimizer_state(self, parameters: Iterable[nn.Parameter]) -> None:
        self.reset_parameters.append(list(parameters))


def optimizer_step(
    method: Method, batch: Batch, optimizer: torch.optim.Optimizer, ctx: TrainContext
) -> LossOutput:
    """One training step in the trainer's order; returns the step's LossOutput."""
    optimizer.zero_grad(set_to_none=True)
    output = method(batch, ctx)
    output.loss.backward()
    method.on_after_backward(ctx)
    for parameter in method.frozen_parameters(ctx):
        parameter.grad = None
    optimizer.step()
    method.on_step_end(ctx)
    return output


def random_batch(
    batch_size: int,
    sizes: tuple[int, ...] = (16, 16, 8, 8),
    num_global: int = 2,
    seed: int = 0,
) -> Batch:
    """A Batch of random views of the given square sizes (globals first), index 0..batch_size-1."""
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch_size, 3, size, size, generator=generator) for size in sizes]
    return Batch(views=views, labels=None, index=torch.arange(batch_size), num_global=num_global)


class TinyBackbone(nn.Module):
    """(batch, 3, H, W) → (batch, num_features): per-channel mean and max, then a linear map. Fast and
    deterministic, for method tests where the backbone is not the subject."""

    def __init__(self, num_features: int = 8) -> None:
        super().__init__()
        self.num_features = num_features
        self.linear = nn.Linear(6, num_features)

    def forward(self, images: Tensor) -> Tensor:
        pooled = torch.cat([images.mean(dim=(2, 3)), images.amax(dim=(2, 3))], dim=1)
        return self.linear(pooled)
