"""Optimizers, per-step schedules and the one optimizer-step path every method goes through.

The step path is the only place that touches gradients: scale → backward → unscale → clip → method hook
→ drop frozen gradients → step. fp32, bf16 and fp16 differ only in whether a GradScaler is present, so
there are no duplicated precision branches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from clusterssl.errors import PipelineError
from clusterssl.models.method import Method, TrainContext
from clusterssl.models.schedules import warmup_cosine_schedule

OPTIMIZERS = ("sgd", "lars", "adamw")


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd, lars (SwAV's large-batch recipe) or adamw (DINO with ViTs)."""
    lr: float = 0.6
    """Peak learning rate at `reference_batch_size`; scaled linearly by the global batch size."""
    reference_batch_size: int = 256
    """The global batch size `lr` is given for (lr_used = lr × global_batch / reference)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay (absolute, not scaled)."""
    warmup_epochs: float = 0.0
    """Linear warm-up from `warmup_start_lr` to the peak; raise it when the loss diverges early."""
    warmup_start_lr: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-6
    """Weight decay at the start; biases and normalisation parameters never get any."""
    weight_decay_end: float | None = None
    """If set, weight decay follows a cosine from `weight_decay` to this value (DINO: 0.04 → 0.4)."""
    clip_grad: float | None = None
    """Clip the global gradient norm to this value (DINO: 3.0); None disables clipping."""
    lars_eta: float = 0.001
    """LARS trust coefficient (only for name=lars)."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise PipelineError(f"unknown optimizer {self.name!r}; known: {', '.join(OPTIMIZERS)}")


def scaled_lr(config: OptimConfig, global_batch_size: int) -> float:
    return config.lr * global_batch_size / config.reference_batch_size


@dataclass(frozen=True)
class StepSchedule:
    """A value per optimizer step: linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then a
    cosine from ``peak`` to ``final`` over the remaining steps of ``total_steps``."""

    peak: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    start: float = 0.0

    def __call__(self, step: int) -> float:
        return warmup_cosine_schedule(
            self.peak, self.final, step, self.total_steps, self.warmup_steps, self.start
        )


def parameter_groups(module: nn.Module) -> list[dict]:
    """Two groups: weights that get weight decay, and biases/normalisation parameters (ndim ≤ 1) that
    don't. LARS also leaves the second group out of its trust-ratio scaling."""
    decay, no_decay = [], []
    for _, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [
        {"params": decay, "apply_weight_decay": True},
        {"params": no_decay, "apply_weight_decay": False, "weight_decay": 0.0},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al.), as used in SwAV's recipe.

    For parameters of groups with ``apply_weight_decay``, the update direction g + wd·w is scaled by
    eta·‖w‖ / ‖g + wd·w‖ (1 when either norm is zero); the other groups take plain SGD steps.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta})

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:  # type: ignore[override]
        assert closure is None, "LARS does not take a closure"
        for group in self.param_groups:
            adapt = group.get("apply_weight_decay", True)
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = parameter.grad
                if adapt:
                    update = update.add(parameter, alpha=group["weight_decay"])
                    weight_norm, update_norm = parameter.norm(), update.norm()
                    trust = torch.where(
                        (weight_norm > 0) & (update_norm > 0), group["eta"] * weight_norm / update_norm, 1.0
                    )
                    update = update.mul(trust)
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                parameter.add_(state["momentum_buffer"], alpha=-group["lr"])


def build_optimizer(config: OptimConfig, module: nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(module)
    for group in groups:
        if group["apply_weight_decay"]:
            group["weight_decay"] = config.weight_decay
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    if config.name == "lars":
        return LARS(groups, lr=config.lr, momentum=config.momentum, eta=config.lars_eta)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


@dataclass(frozen=True)
class Schedules:
    lr: StepSchedule
    weight_decay: StepSchedule

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> tuple[float, float]:
        """Set this step's lr (all groups) and weight decay (decayed groups); returns both."""
        lr, wd = self.lr(step), self.weight_decay(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group.get("apply_weight_decay", True):
                group["weight_decay"] = wd
        return lr, wd


def build_schedules(
    config: OptimConfig, *, global_batch_size: int, steps_per_epoch: int, epochs: int
) -> Schedules:
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    lr = StepSchedule(
        peak=scaled_lr(config, global_batch_size),
        final=config.min_lr,
        total_steps=total,
        warmup_steps=warmup,
        start=config.warmup_start_lr,
    )
    wd_end = config.weight_decay if config.weight_decay_end is None else config.weight_decay_end
    weight_decay = StepSchedule(peak=config.weight_decay, final=wd_end, total_steps=total)
    return Schedules(lr=lr, weight_decay=weight_decay)


class OptimizerStep:
    """The one optimizer-step path: scale, backward, unscale, clip, method hook, drop frozen grads, step.

    ``scaler`` is a GradScaler for fp16 and None otherwise (fp32 and bf16 need no loss scaling).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        clip_grad: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.clip_grad = clip_grad
        self.scaler = scaler

    def __call__(self, loss: torch.Tensor, method: Method, ctx: TrainContext) -> torch.Tensor | None:
        """Back-propagate ``loss`` and take one step; returns the gradient norm before clipping as a 0-dim
        tensor on the device (None without clipping), not read back, so that the step never waits for
        the GPU."""
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.clip_grad is not None:
            parameters = [
                p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None
            ]
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.clip_grad).detach()
        method.on_after_backward(ctx)
        for parameter in method.frozen_parameters(ctx):
            parameter.grad = None
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return grad_norm
