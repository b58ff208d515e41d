"""Schedules, parameter groups, LARS and the single optimizer-step path, checked against hand computations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from clusterssl.models.method import Method
from clusterssl.models.types import Batch, LossOutput
from clusterssl.pipeline.train.optim import (
    LARS,
    OptimConfig,
    OptimizerStep,
    StepSchedule,
    build_optimizer,
    build_schedules,
    parameter_groups,
)


def test_step_schedule_warmup_then_cosine() -> None:
    schedule = StepSchedule(peak=1.0, final=0.0, total_steps=10, warmup_steps=2, start=0.0)
    assert [schedule(s) for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    # cosine over the remaining 8 steps: halfway (step 6) is the mean of peak and final
    assert schedule(6) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(0.0)
    assert schedule(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))


def test_schedules_scale_lr_by_global_batch() -> None:
    config = OptimConfig(
        lr=0.3, reference_batch_size=256, warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4
    )
    schedules = build_schedules(config, global_batch_size=512, steps_per_epoch=5, epochs=3)
    assert schedules.lr(5) == pytest.approx(0.6)
    assert schedules.weight_decay(0) == pytest.approx(0.04)
    assert schedules.weight_decay(15) == pytest.approx(0.4)


def test_biases_and_norms_get_no_weight_decay() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
    decay, no_decay = parameter_groups(model)
    assert {p.shape for p in decay["params"]} == {torch.Size([4, 3]), torch.Size([2, 4])}
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    optimizer = build_optimizer(OptimConfig(name="adamw", weight_decay=0.05), model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]


def test_lars_step_matches_hand_computation() -> None:
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    bias = nn.Parameter(torch.tensor([1.0]))
    weight.grad = torch.tensor([[0.0, 1.0]])
    bias.grad = torch.tensor([2.0])
    optimizer = LARS(
        [{"params": [weight], "apply_weight_decay": True, "weight_decay": 0.1},
         {"params": [bias], "apply_weight_decay": False, "weight_decay": 0.0}],
        lr=0.5, momentum=0.9, eta=0.01,
    )  # fmt: skip
    optimizer.step()
    update = torch.tensor([[0.3, 1.4]])  # g + wd * w
    trust = 0.01 * 5.0 / update.norm()
    torch.testing.assert_close(weight.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * trust * update)
    torch.testing.assert_close(bias.detach(), torch.tensor([1.0 - 0.5 * 2.0]))


@dataclass
class _Ctx:
    step: int = 0
    epoch: int = 0
    frozen: list = field(default_factory=list)


class _TwoLayer(Method):
    """y = b(a(x)); ``b`` is reported frozen, so its weights must not move."""

    name = "two-layer"

    def __init__(self) -> None:
        super().__init__(nn.Linear(2, 2, bias=False))
        self.head = nn.Linear(2, 1, bias=False)
        self.after_backward_calls = 0

    def forward(self, batch: Batch, ctx: object) -> LossOutput:  # type: ignore[override]
        return LossOutput(self.head(self.backbone(batch.views[0])).sum())

    def on_after_backward(self, ctx) -> None:  # type: ignore[override]
        self.after_backward_calls += 1
        assert self.head.weight.grad is not None, "hook runs before frozen grads are dropped"

    def frozen_parameters(self, ctx):  # type: ignore[override]
        return [self.head.weight]


def test_step_path_clips_then_drops_frozen_grads() -> None:
    torch.manual_seed(0)
    method = _TwoLayer()
    before_head = method.head.weight.detach().clone()
    before_backbone = method.backbone.weight.detach().clone()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    step = OptimizerStep(optimizer, clip_grad=1e-3)
    batch = Batch(views=[torch.ones(4, 2)], labels=None, index=torch.arange(4), num_global=1)
    out = method(batch, _Ctx())
    out.loss.backward()
    expected_grad = method.backbone.weight.grad.clone()
    full_norm = torch.cat([method.backbone.weight.grad.flatten(), method.head.weight.grad.flatten()]).norm()
    optimizer.zero_grad()
    grad_norm = step(method(batch, _Ctx()).loss, method, _Ctx())
    assert grad_norm is not None and grad_norm.item() == pytest.approx(full_norm.item(), rel=1e-6)
    assert method.after_backward_calls == 1
    torch.testing.assert_close(method.head.weight.detach(), before_head)
    clipped = expected_grad * (1e-3 / (full_norm + 1e-6))
    torch.testing.assert_close(method.backbone.weight.detach(), before_backbone - 0.1 * clipped)
