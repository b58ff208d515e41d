"""DINO (Caron et al., 2021): self-distillation with no labels.

A student (backbone + DINO head) sees every crop; a teacher, the exponential moving average of the student,
sees the global crops without gradient. The loss is the cross-entropy between the teacher's centred,
sharpened distribution ``softmax((t − c)/τ_t)`` and the student's ``log_softmax(s/τ_s)`` for every pair of
different crops; the centre c is an EMA of the teacher's mean output. Centring keeps one dimension from
dominating, sharpening keeps the output from going uniform: together they avoid collapse (Caron et al., 2021).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterssl.errors import ModelError
from clusterssl.models import collectives
from clusterssl.models.backbones import embed_views, without_stochastic_depth
from clusterssl.models.ema import ema_update_, frozen_copy
from clusterssl.models.heads import DINOHead
from clusterssl.models.losses import cross_entropy_to_other_views
from clusterssl.models.method import Method, MethodConfig, TrainContext
from clusterssl.models.metrics import scalar_metrics
from clusterssl.models.schedules import cosine_schedule, linear_warmup
from clusterssl.models.types import Batch, LossOutput


@dataclass
class DINOConfig(MethodConfig):
    """DINO's settings; defaults are the recommended ViT-S/16 ImageNet recipe."""

    name: str = field(default="dino", init=False)

    out_dim: int = 65536
    """K, the size of the head's output. Large K helps on ImageNet; a few thousand suffice for small data."""
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    """Fix the last layer's row norms at 1. Stabler; set False for small ViTs only if training is stable."""
    use_bn_in_head: bool = False
    """BatchNorm in the head's MLP (helps ResNet backbones, not ViTs)."""
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    """τ_t at epoch 0. Lower it if the loss does not decrease at the start."""
    teacher_temp: float = 0.07
    """τ_t after the warm-up. Above 0.07 training tends to collapse; lower it (0.04) if it does."""
    warmup_teacher_temp_epochs: int = 30
    """Epochs of the linear τ_t warm-up."""
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996
    """Initial EMA momentum of the teacher, raised to 1 by a cosine over the run. 0.996 suits bs 1024;
    raise it (0.9995) for small batches."""
    freeze_last_layer: int = 1
    """Epochs during which the head's last layer gets no gradient. Raise it if the loss goes unstable early."""

    def __post_init__(self) -> None:
        for key in ("out_dim", "hidden_dim", "bottleneck_dim"):
            if getattr(self, key) < 1:
                raise ModelError(f"dino: {key} must be at least 1, got {getattr(self, key)}")
        for key in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            if getattr(self, key) <= 0:
                raise ModelError(f"dino: {key} must be positive, got {getattr(self, key)}")
        for key in ("warmup_teacher_temp_epochs", "freeze_last_layer"):
            if getattr(self, key) < 0:
                raise ModelError(f"dino: {key} must be non-negative, got {getattr(self, key)}")
        for key in ("center_momentum", "momentum_teacher"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ModelError(f"dino: {key} must lie in [0, 1], got {getattr(self, key)}")

    def teacher_temperature(self, epoch: int) -> float:
        """τ_t at ``epoch``: linear from ``warmup_teacher_temp`` (epoch 0) to ``teacher_temp`` (epoch
        ``warmup_teacher_temp_epochs − 1``), constant afterwards, as DINO's ``np.linspace`` schedule."""
        return linear_warmup(
            self.warmup_teacher_temp, self.teacher_temp, epoch, self.warmup_teacher_temp_epochs
        )

    def teacher_momentum(self, step: int, total_steps: int) -> float:
        """EMA momentum at optimizer step ``step`` (0-based) of ``total_steps``: cosine from
        ``momentum_teacher`` to 1."""
        return cosine_schedule(self.momentum_teacher, 1.0, step, total_steps)


class DINOLoss(nn.Module):
    """DINO's loss with its centre.

    forward(student_outputs, teacher_outputs, teacher_temp):
        student_outputs: S tensors (batch, out_dim), one per crop, global crops first.
        teacher_outputs: T tensors (batch, out_dim), the teacher's raw outputs for the T global crops,
                         which are the student's crops 0..T−1.
        Returns the mean over pairs (t, s ≠ t) of mean_b −Σ_k softmax((t − c)/τ_t)_k log softmax(s/τ_s)_k,
        then updates ``center`` ← m·center + (1 − m)·mean of the raw teacher outputs over all crops and
        the global batch (all-reduced). Computed in float32.
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probabilities(self, teacher: Tensor, teacher_temp: float) -> Tensor:
        """(..., out_dim) raw teacher outputs → centred, sharpened distributions (same shape)."""
        return F.softmax((teacher.float() - self.center) / teacher_temp, dim=-1)

    def forward(
        self,
        student_outputs: Sequence[Tensor],
        teacher_outputs: Sequence[Tensor],
        teacher_temp: float,
        *,
        update_center: bool = True,
    ) -> Tensor:
        if len(teacher_outputs) > len(student_outputs):
            raise ValueError(f"{len(teacher_outputs)} teacher crops but {len(student_outputs)} student crops")
        with torch.autocast(device_type=self.center.device.type, enabled=False):
            targets = [self.teacher_probabilities(t.detach(), teacher_temp) for t in teacher_outputs]
            log_probs = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_outputs]
            # Teacher crop t is student crop t (the global crops come first): that pair is skipped.
            loss = cross_entropy_to_other_views(targets, range(len(targets)), log_probs)
        if update_center:
            self.update_center(torch.cat([t.detach() for t in teacher_outputs]))
        return loss

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """(T, B, K) or (n, K) raw teacher outputs → EMA of their mean over crops and the global batch."""
        flat = teacher.detach().float().reshape(-1, teacher.shape[-1])
        total = collectives.all_reduce_sum(flat.sum(dim=0, keepdim=True))
        count = flat.shape[0] * collectives.world_size()
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1.0 - self.center_momentum)


@torch.no_grad()
def collapse_metrics(
    student: Tensor, teacher: Tensor, center: Tensor, student_temp: float, teacher_temp: float
) -> dict[str, Tensor]:
    """DINO's collapse indicators (paper §5.3), as 0-dim tensors; entropies in nats, ln K the maximum.

    student: (S, B, K) and teacher: (T, B, K) raw outputs; center: (1, K), *before* this step's update.
    With p_t = softmax((t − c)/τ_t), p_s = softmax(s/τ_s):

    teacher_entropy:          mean over teacher crops and samples of H(p_t). Goes to ln K when the
                              output collapses to uniform (centring wins), to 0 when sharpening wins.
    teacher_marginal_entropy: H(mean over crops and samples of p_t). Near 0 when every sample picks the
                              same dimension (one-dimension collapse).
    kl_teacher_student:       mean over pairs (t, s ≠ t) and samples of KL(p_t ‖ p_s) = loss − H(p_t).
                              Drops to 0 when teacher and student agree trivially, in either collapse.
    kl_teacher_center:        mean over teacher crops and samples of KL(softmax(t/τ_t) ‖ softmax(c/τ_t)):
                              how far each teacher output is from the running mean output; 0 when the
                              teacher emits one constant vector whatever the input.
    """
    teacher = teacher.float()
    targets = F.softmax((teacher - center) / teacher_temp, dim=-1)
    log_targets = F.log_softmax((teacher - center) / teacher_temp, dim=-1)
    entropy = -(targets * log_targets).sum(dim=-1)  # (T, B)
    marginal = targets.mean(dim=(0, 1))
    marginal_entropy = -(marginal * torch.log(marginal.clamp_min(1e-12))).sum()

    log_student = F.log_softmax(student.float() / student_temp, dim=-1)
    cross = cross_entropy_to_other_views(list(targets), range(len(targets)), list(log_student))
    # KL = CE − H, and every teacher crop appears in the same number of pairs.
    kl_student = cross - entropy.mean()

    log_raw = F.log_softmax(teacher / teacher_temp, dim=-1)
    log_center = F.log_softmax(center.float() / teacher_temp, dim=-1)
    kl_center = (log_raw.exp() * (log_raw - log_center)).sum(dim=-1).mean()
    return {
        "teacher_entropy": entropy.mean(),
        "teacher_marginal_entropy": marginal_entropy,
        "kl_teacher_student": kl_student,
        "kl_teacher_center": kl_center,
    }


class DINO(Method):
    """Student backbone + DINOHead, EMA teacher (``teacher_backbone``, ``teacher_head``), DINOLoss.

    The teacher is a deep copy with ``requires_grad=False``, updated in ``on_step_end``; its BatchNorm
    statistics (ResNet backbones, ``use_bn_in_head``) come from its own forward passes, as in the original.
    Evaluation embeds with the teacher's backbone (``feature_extractor``), which the paper found better.
    """

    name: ClassVar[str] = "dino"
    config_class: ClassVar[type[MethodConfig]] = DINOConfig

    def __init__(self, backbone: nn.Module, cfg: DINOConfig | None = None) -> None:
        super().__init__(backbone)
        self.cfg = cfg = cfg or DINOConfig()
        self.head = DINOHead(
            int(backbone.num_features),
            cfg.out_dim,
            hidden_dim=cfg.hidden_dim,
            bottleneck_dim=cfg.bottleneck_dim,
            use_bn=cfg.use_bn_in_head,
            norm_last_layer=cfg.norm_last_layer,
        )
        # The teacher sees whole networks: the original builds it without stochastic depth, and a copy
        # of a student with drop_path_rate > 0 would otherwise drop paths too (it runs in train mode).
        self.teacher_backbone = without_stochastic_depth(frozen_copy(backbone))
        self.teacher_head = frozen_copy(self.head)
        self.loss_fn = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)

    # ------------------------------------------------------------------------------------------- hooks

    def on_step_end(self, ctx: TrainContext) -> None:
        """Teacher ← m·teacher + (1 − m)·student with m the cosine momentum at this step."""
        momentum = self.cfg.teacher_momentum(ctx.step, ctx.epochs * ctx.steps_per_epoch)
        teacher, student = (self.teacher_backbone, self.teacher_head), (self.backbone, self.head)
        ema_update_(teacher, student, momentum, copy_buffers=False)

    def frozen_parameters(self, ctx: TrainContext) -> Iterable[nn.Parameter]:
        """The head's last layer during the first ``freeze_last_layer`` epochs."""
        return tuple(self.head.last_layer.parameters()) if ctx.epoch < self.cfg.freeze_last_layer else ()

    def feature_extractor(self) -> nn.Module:
        return self.teacher_backbone

    # ----------------------------------------------------------------------------------------- forward

    def forward(self, batch: Batch, ctx: TrainContext) -> LossOutput:
        if len(batch.views) < 2:
            raise ModelError(f"dino needs at least 2 views per sample, got {len(batch.views)}")
        size = batch.size
        student = self.head(embed_views(self.backbone, batch.views)).view(len(batch.views), size, -1)
        with torch.no_grad():
            teacher_views = batch.global_views
            teacher = self.teacher_head(embed_views(self.teacher_backbone, teacher_views))
            teacher = teacher.view(len(teacher_views), size, -1)
        teacher_temp = self.cfg.teacher_temperature(ctx.epoch)

        valid = batch.valid
        metrics = collapse_metrics(
            student.detach()[:, valid],
            teacher[:, valid],
            self.loss_fn.center,
            self.cfg.student_temp,
            teacher_temp,
        )
        loss = self.loss_fn(list(student), list(teacher), teacher_temp, update_center=self.training)
        # torch.full writes the value on the device; torch.tensor(value, device=…) would copy it over and wait
        metrics["teacher_temp"] = torch.full((), teacher_temp, device=loss.device)
        return LossOutput(loss=loss, metrics=scalar_metrics(metrics))
