"""iBOT (Zhou et al., ICLR 2022): masked image modelling with an online tokenizer.

DINO's self-distillation, extended from the class token to the patch tokens. The student sees the global
crops with block-wise masks (a learned mask token replaces the masked patch embeddings) and the local
crops unmasked; the teacher, the EMA of the student, sees the global crops unmasked. The loss is

    λ1 · L_cls + λ2 · L_mim

L_cls is DINO's loss on the class tokens (every teacher crop against every other student crop).
L_mim is, for each global crop, the cross-entropy between the teacher's centred, sharpened patch
distribution ``softmax((t_j − c')/τ'_t)`` and the student's ``log_softmax(s_j/τ_s)`` at each masked patch
j of the *same* crop, averaged over the image's masked patches, then over images and crops. The teacher's
patch distributions are the online tokenizer: a learned, sharpened codebook over ``patch_out_dim``
entries. Each head has its own centre (EMA of the teacher's mean output) and its own teacher temperature
warm-up. Built on DINO's pieces: DINOHead, DINOLoss (its centre), the teacher schedules, ema_update_.
Reference implementation: github.com/bytedance/ibot.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterssl.errors import ModelError
from clusterssl.models.backbones import embed_views, without_stochastic_depth
from clusterssl.models.dino import DINOConfig, DINOLoss, collapse_metrics, teacher_collapse_metrics
from clusterssl.models.ema import ema_update_, frozen_copy
from clusterssl.models.heads import DINOHead
from clusterssl.models.masking import BlockMaskSpec, draw_block_masks
from clusterssl.models.method import Method, TrainContext
from clusterssl.models.metrics import scalar_metrics
from clusterssl.models.schedules import linear_warmup
from clusterssl.models.types import Batch, LossOutput


@dataclass
class IBOTConfig(DINOConfig):
    """iBOT's settings: DINO's (class-token head, temperatures, teacher momentum) plus the patch head,
    the loss weights and the masks. Defaults are the ViT-S/16 ImageNet recipe of the iBOT repository."""

    name: str = field(default="ibot", init=False)

    out_dim: int = 8192
    """K of the class-token head. iBOT uses 8,192 (DINO 65,536): the patch objective needs fewer."""
    patch_out_dim: int = 8192
    """K of the patch head when it is separate (``shared_head: false``); with a shared head it is out_dim."""
    shared_head: bool = True
    """One head for the class and the patch tokens (the recipe). False: the patch tokens get their own
    last layer (size patch_out_dim) on the shared MLP, the paper's other option."""
    warmup_teacher_patch_temp: float = 0.04
    """τ'_t of the patch head at epoch 0."""
    teacher_patch_temp: float = 0.07
    """τ'_t of the patch head after the warm-up (same length as the class head's)."""
    lambda1: float = 1.0
    """Weight of the class-token distillation."""
    lambda2: float = 1.0
    """Weight of the masked patch prediction. 0 turns iBOT into DINO with masked student inputs."""
    mask_ratio: float = 0.3
    """Mean share of the patches masked in a masked global crop."""
    mask_ratio_var: float = 0.2
    """The masked share is drawn uniformly in mask_ratio ± mask_ratio_var, per image."""
    mask_share: float = 0.5
    """Share of the global crops that are masked at all (the recipe's prediction ratio 0 or 0.3 ± 0.2)."""
    mask_min_aspect: float = 0.3
    """Mask blocks have an aspect ratio in [mask_min_aspect, 1/mask_min_aspect]."""
    mask_seed: int = 0
    """Key of the mask generator, with the epoch, the sample index and the view."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_out_dim < 1:
            raise ModelError(f"ibot: patch_out_dim must be at least 1, got {self.patch_out_dim}")
        for key in ("warmup_teacher_patch_temp", "teacher_patch_temp"):
            if getattr(self, key) <= 0:
                raise ModelError(f"ibot: {key} must be positive, got {getattr(self, key)}")
        for key in ("lambda1", "lambda2", "mask_seed"):
            if getattr(self, key) < 0:
                raise ModelError(f"ibot: {key} must be non-negative, got {getattr(self, key)}")
        try:
            self.mask_spec()
        except ValueError as error:
            raise ModelError(f"ibot: {error}") from None

    def mask_spec(self) -> BlockMaskSpec:
        return BlockMaskSpec(self.mask_ratio, self.mask_ratio_var, self.mask_share, self.mask_min_aspect)

    @property
    def patch_dim(self) -> int:
        """K of the patch outputs."""
        return self.out_dim if self.shared_head else self.patch_out_dim

    def teacher_patch_temperature(self, epoch: int) -> float:
        """τ'_t at ``epoch``: the same linear warm-up as the class head's, between the patch values."""
        return linear_warmup(
            self.warmup_teacher_patch_temp, self.teacher_patch_temp, epoch, self.warmup_teacher_temp_epochs
        )


def masked_patch_cross_entropy(
    teacher_probs: Tensor, student_log_probs: Tensor, image_ids: Tensor, num_images: int
) -> Tensor:
    """iBOT's patch loss from the masked tokens only.

    teacher_probs:     (M, K) the teacher's distributions at the M masked patches of all images.
    student_log_probs: (M, K) the student's log-distributions at the same patches.
    image_ids:         (M,) int64, the image (0..num_images−1) each patch belongs to.
    Returns (1/num_images) Σ_i (1/|m_i|) Σ_{j ∈ m_i} −Σ_k p_t[j, k] log p_s[j, k], where m_i are image i's
    masked patches; an image without masked patches adds 0 but still counts in num_images, as in the
    original (its denominator is clamped at 1).
    """
    per_patch = -(teacher_probs * student_log_probs).sum(dim=-1)  # (M,)
    counts = torch.bincount(image_ids, minlength=num_images).clamp_min(1).to(per_patch.dtype)
    return (per_patch / counts[image_ids]).sum() / num_images


class IBOT(Method):
    """Student ViT + DINOHead (+ a patch last layer), EMA teacher of the same parts, learned mask token.

    The teacher (``teacher``: backbone, head and, when separate, patch_head) is built and updated in
    ``_student_parts``/``on_step_end`` only. Evaluation embeds with the teacher's backbone, as iBOT's
    released checkpoints do.
    """

    name: ClassVar[str] = "ibot"
    config_class: ClassVar[type[DINOConfig]] = IBOTConfig

    def __init__(self, backbone: nn.Module, cfg: IBOTConfig | None = None) -> None:
        super().__init__(backbone)
        if not self.supports(backbone):
            raise ModelError(
                f"ibot needs a ViT backbone (it predicts patch tokens), got {type(backbone).__name__}"
            )
        self.cfg = cfg = cfg or IBOTConfig()
        dim = int(backbone.num_features)
        # Starts at zero, as in the original: a masked patch begins as its position embedding alone.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.head = self._new_head(dim, cfg.out_dim)
        self.patch_head: DINOHead | None = None
        if not cfg.shared_head:
            self.patch_head = self._new_head(dim, cfg.patch_out_dim)
            self.patch_head.mlp = self.head.mlp  # separate last layer on the shared MLP, as the original
        self.teacher = without_stochastic_depth(frozen_copy(self._student_parts()))
        self.cls_loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        # A second DINOLoss for its centre alone: the patch centre is DINO's, over all teacher patch tokens.
        self.patch_center = DINOLoss(cfg.patch_dim, cfg.student_temp, cfg.center_momentum)

    @classmethod
    def supports(cls, backbone: nn.Module) -> bool:
        """A ViT: the patch tokens (``forward_features``) on a known patch grid (``patch_grid``)."""
        return callable(getattr(backbone, "forward_features", None)) and callable(
            getattr(backbone, "patch_grid", None)
        )

    def _new_head(self, dim: int, out_dim: int) -> DINOHead:
        cfg = self.cfg
        return DINOHead(
            dim,
            out_dim,
            hidden_dim=cfg.hidden_dim,
            bottleneck_dim=cfg.bottleneck_dim,
            use_bn=cfg.use_bn_in_head,
            norm_last_layer=cfg.norm_last_layer,
        )

    def _student_parts(self) -> nn.ModuleDict:
        """The modules the teacher mirrors, under the teacher's names (a view, not registered)."""
        parts: dict[str, nn.Module] = {"backbone": self.backbone, "head": self.head}
        if self.patch_head is not None:
            parts["patch_head"] = self.patch_head
        return nn.ModuleDict(parts)

    # ------------------------------------------------------------------------------------------- hooks

    def on_step_end(self, ctx: TrainContext) -> None:
        """Teacher ← m·teacher + (1 − m)·student, m DINO's cosine momentum at this step."""
        momentum = self.cfg.teacher_momentum(ctx.step, ctx.epochs * ctx.steps_per_epoch)
        ema_update_(self.teacher, self._student_parts(), momentum, copy_buffers=False)

    def frozen_parameters(self, ctx: TrainContext) -> Iterable[nn.Parameter]:
        """The heads' last layers during the first ``freeze_last_layer`` epochs."""
        if ctx.epoch >= self.cfg.freeze_last_layer:
            return ()
        heads = [self.head] if self.patch_head is None else [self.head, self.patch_head]
        return tuple(p for head in heads for p in head.last_layer.parameters())

    def feature_extractor(self) -> nn.Module:
        return self.teacher["backbone"]

    # ----------------------------------------------------------------------------------------- forward

    def masks(self, batch: Batch, epoch: int) -> Tensor:
        """(num_global, batch, patches) bool block masks of the global crops in ``epoch``."""
        grid = self.backbone.patch_grid(*batch.views[0].shape[-2:])
        # the loader's host copy of the indices when there is one: no wait for the device every step
        index = batch.host_index if batch.host_index is not None else batch.index.detach().cpu().numpy()
        drawn = draw_block_masks(
            self.cfg.mask_spec(), self.cfg.mask_seed, epoch, index, batch.num_global, grid
        )
        return torch.from_numpy(drawn).to(batch.views[0].device)

    def forward(self, batch: Batch, ctx: TrainContext) -> LossOutput:
        if len(batch.views) < 2:
            raise ModelError(f"ibot needs at least 2 views per sample, got {len(batch.views)}")
        cfg = self.cfg
        crops, size = batch.num_global, batch.size
        images = torch.cat(batch.global_views)  # (T·B, 3, H, W), crop-major
        masks = self.masks(batch, ctx.epoch).flatten(0, 1)  # (T·B, N)
        patch_head = self.head if self.patch_head is None else self.patch_head

        tokens = self.backbone.forward_features(images, masks, self.mask_token[0])  # (T·B, 1 + N, D)
        cls_features = tokens[:, 0]
        if batch.local_views:  # local crops are never masked and only give class tokens
            cls_features = torch.cat([cls_features, embed_views(self.backbone, batch.local_views)])
        student_cls = self.head(cls_features).view(len(batch.views), size, -1)
        # The student's patch outputs matter only where the loss reads them: the masked patches.
        student_patch = patch_head(tokens[:, 1:][masks])  # (M, K')
        image_ids = masks.nonzero()[:, 0]  # (M,) crop-major image number of each masked patch

        with torch.no_grad():
            teacher = self.teacher
            teacher_tokens = teacher["backbone"].forward_features(images)
            teacher_cls = teacher["head"](teacher_tokens[:, 0]).view(crops, size, -1)
            teacher_patch_head = teacher["patch_head"] if "patch_head" in teacher else teacher["head"]
            patch_tokens = teacher_tokens[:, 1:]
            teacher_patch = teacher_patch_head(patch_tokens.flatten(0, 1)).view(*patch_tokens.shape[:2], -1)

        teacher_temp = cfg.teacher_temperature(ctx.epoch)
        patch_temp = cfg.teacher_patch_temperature(ctx.epoch)
        metrics = self._metrics(
            batch, student_cls, teacher_cls, teacher_patch, masks, teacher_temp, patch_temp
        )

        cls_loss = self.cls_loss(
            list(student_cls), list(teacher_cls), teacher_temp, update_center=self.training
        )
        with torch.autocast(device_type=images.device.type, enabled=False):
            targets = self.patch_center.teacher_probabilities(teacher_patch[masks], patch_temp)
            log_probs = F.log_softmax(student_patch.float() / cfg.student_temp, dim=-1)
            patch_loss = masked_patch_cross_entropy(targets, log_probs, image_ids, crops * size)
        if self.training:
            self.patch_center.update_center(teacher_patch)
        loss = cfg.lambda1 * cls_loss + cfg.lambda2 * patch_loss
        metrics["cls_loss"] = cls_loss.detach()
        metrics["patch_loss"] = patch_loss.detach()
        return LossOutput(loss=loss, metrics=scalar_metrics(metrics))

    @torch.no_grad()
    def _metrics(
        self,
        batch: Batch,
        student_cls: Tensor,
        teacher_cls: Tensor,
        teacher_patch: Tensor,
        masks: Tensor,
        teacher_temp: float,
        patch_temp: float,
    ) -> dict[str, Tensor]:
        """DINO's collapse metrics for the class head, the teacher ones for the patch head (``patch_``),
        over the real samples, with the centres before this step's update; plus the masked share."""
        valid = batch.valid
        crops = batch.num_global
        metrics = collapse_metrics(
            student_cls.detach()[:, valid],
            teacher_cls[:, valid],
            self.cls_loss.center,
            self.cfg.student_temp,
            teacher_temp,
        )
        patches = teacher_patch.view(crops, batch.size, *teacher_patch.shape[1:])[:, valid]
        patch_metrics = teacher_collapse_metrics(patches.flatten(1, 2), self.patch_center.center, patch_temp)
        metrics.update({f"patch_{key}": value for key, value in patch_metrics.items()})
        metrics["masked_share"] = masks.view(crops, batch.size, -1)[:, valid].float().mean()
        device = teacher_cls.device
        metrics["teacher_temp"] = torch.tensor(teacher_temp, device=device)
        metrics["patch_teacher_temp"] = torch.tensor(patch_temp, device=device)
        return metrics
