"""SwAV (Caron et al., 2020): swapped prediction of Sinkhorn codes across multi-crop views.

Per step, as in the paper and its code: prototypes are re-normalised; every view goes through backbone → projection MLP →
L2-normalisation → prototype scores; codes are computed without gradient by Sinkhorn for the assignment
crops only (the two global crops), optionally with a queue of past embeddings placed before the batch; each
assignment crop's code is predicted from every other crop by ``softmax(scores / τ)``, and the loss is the
cross-entropy averaged over those (crops − 1) predictions and over the assignment crops.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterssl.errors import ModelError
from clusterssl.models import collectives
from clusterssl.models.backbones import embed_views
from clusterssl.models.buffers import RuntimeShapedBuffers
from clusterssl.models.heads import Prototypes, projection_head
from clusterssl.models.losses import cross_entropy_to_other_views
from clusterssl.models.method import Method, MethodConfig, TrainContext
from clusterssl.models.metrics import scalar_metrics
from clusterssl.models.sinkhorn import sinkhorn
from clusterssl.models.types import Batch, LossOutput


@dataclass
class SwAVConfig(MethodConfig):
    """SwAV's settings; defaults are the paper's ImageNet recipe (bs 4096, 800 epochs)."""

    name: str = field(default="swav", init=False)

    hidden_dim: int = 2048
    """Width of the projection MLP's hidden layer; 0 makes the projection a single linear layer."""
    feat_dim: int = 128
    """Size of the L2-normalised embedding compared with the prototypes."""
    num_prototypes: int = 3000
    """K. Roughly 10× the number of classes you expect; lower it for small data (e.g. 30–100 on digits)."""
    temperature: float = 0.1
    """τ of the softmax that predicts codes from scores."""
    epsilon: float = 0.05
    """Sinkhorn's entropy regularisation. Lower (0.03) if the loss sticks at ln K (collapse)."""
    sinkhorn_iterations: int = 3
    crops_for_assign: tuple[int, ...] = (0, 1)
    """Views whose codes are computed (and predicted from every other view): the global crops."""
    freeze_prototypes_niters: int = 313
    """Optimizer steps during which the prototypes get no gradient (≈ the first epoch at bs 4096).
    Raise it if training collapses early."""
    queue_length: int = 0
    """Embeddings of past batches added to Sinkhorn's batch, per assignment crop, over all ranks; rounded
    down to a multiple of the global batch. 0 = off. Use one (e.g. 3840) when the global batch is below
    ~1000, where the equipartition over a small batch is too strict."""
    epoch_queue_starts: int = 15
    """Epoch from which the queue is filled (and used once full); early embeddings change too fast."""

    def __post_init__(self) -> None:
        for key in ("feat_dim", "num_prototypes", "sinkhorn_iterations"):
            if getattr(self, key) < 1:
                raise ModelError(f"swav: {key} must be at least 1, got {getattr(self, key)}")
        for key in ("hidden_dim", "freeze_prototypes_niters", "queue_length", "epoch_queue_starts"):
            if getattr(self, key) < 0:
                raise ModelError(f"swav: {key} must be non-negative, got {getattr(self, key)}")
        for key in ("temperature", "epsilon"):
            if getattr(self, key) <= 0:
                raise ModelError(f"swav: {key} must be positive, got {getattr(self, key)}")
        if not self.crops_for_assign or len(set(self.crops_for_assign)) != len(self.crops_for_assign):
            raise ModelError(f"swav: crops_for_assign must list distinct views, got {self.crops_for_assign}")
        if min(self.crops_for_assign) < 0:
            raise ModelError(f"swav: crops_for_assign must be view indices >= 0, got {self.crops_for_assign}")


def swav_loss(
    scores: Tensor | Sequence[Tensor],
    codes: Tensor | Sequence[Tensor],
    crops_for_assign: Sequence[int],
    temperature: float,
) -> Tensor:
    """SwAV's swapped-prediction loss.

    scores:  (views, batch, K) prototype scores of every view (or a list of (batch, K)), with gradient.
    codes:   (assign, batch, K) Sinkhorn codes of the assignment views (or a list), in the order of
             ``crops_for_assign``; no gradient.
    Returns ``(1/A) Σ_a (1/(V−1)) Σ_{v ≠ crops_for_assign[a]} mean_b −Σ_k q_a[b,k] log softmax(s_v[b]/τ)_k``,
    computed in float32.
    """
    if len(scores) < 2:
        raise ModelError(f"swav needs at least 2 views per sample, got {len(scores)}")
    with torch.autocast(device_type=_device_type(scores), enabled=False):
        log_probs = [F.log_softmax(view_scores.float() / temperature, dim=-1) for view_scores in scores]
        return cross_entropy_to_other_views([q.float() for q in codes], crops_for_assign, log_probs)


def code_metrics(codes: Tensor) -> dict[str, Tensor]:
    """Collapse indicators of (n, K) codes, as 0-dim tensors.

    code_entropy:     mean over samples of −Σ_k q_k ln q_k, in nats (0 = one-hot, ln K = uniform).
    code_sharpness:   mean over samples of max_k q_k (1 = one-hot, 1/K = uniform).
    prototypes_used:  number of distinct prototypes that are some sample's argmax.
    """
    entropy = -(codes * torch.log(codes.clamp_min(1e-12))).sum(dim=1).mean()
    sharpness = codes.max(dim=1).values.mean()
    # A mask of the argmaxes counted on the device: torch.unique would need the count on the host.
    used = torch.zeros(codes.shape[1], dtype=torch.bool, device=codes.device)
    used[codes.argmax(dim=1)] = True
    return {
        "code_entropy": entropy,
        "code_sharpness": sharpness,
        "prototypes_used": used.sum().float(),
    }


class SwAV(RuntimeShapedBuffers, Method):
    """Backbone → projection MLP → L2-normalise → prototypes, trained with swapped Sinkhorn codes.

    Buffers that checkpoint with the module: ``queue`` (assign crops, rows, feat_dim) of past embeddings,
    newest first, and ``queue_filled``, how many of its rows hold real embeddings. The queue's length
    depends on the global batch, so it is allocated at the first training step and resized when a
    checkpoint is loaded.
    """

    name: ClassVar[str] = "swav"
    config_class: ClassVar[type[MethodConfig]] = SwAVConfig
    # the queue's shape is set by the batch at run time: a checkpoint's shape is taken before loading
    runtime_buffers: ClassVar[tuple[str, ...]] = ("queue",)

    def __init__(self, backbone: nn.Module, cfg: SwAVConfig | None = None) -> None:
        super().__init__(backbone)
        self.cfg = cfg = cfg or SwAVConfig()
        in_dim = int(backbone.num_features)
        self.projection = projection_head(in_dim, cfg.hidden_dim, cfg.feat_dim)
        self.prototypes = Prototypes(cfg.feat_dim, cfg.num_prototypes)
        self.register_buffer("queue", torch.zeros(len(cfg.crops_for_assign), 0, cfg.feat_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        # ``queue_filled`` as a Python int, so that the step decides whether to use the queue without
        # reading the buffer back from the GPU; restored with the buffer when a checkpoint is loaded.
        self.queue_rows_filled = 0

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        saved = state_dict.get(prefix + "queue_filled")
        if isinstance(saved, Tensor):
            self.queue_rows_filled = int(saved)

    # ------------------------------------------------------------------------------------------- hooks

    def frozen_parameters(self, ctx: TrainContext) -> Iterable[nn.Parameter]:
        """The prototypes during the first ``freeze_prototypes_niters`` optimizer steps."""
        return (self.prototypes.weight,) if ctx.step < self.cfg.freeze_prototypes_niters else ()

    # ----------------------------------------------------------------------------------------- forward

    def embed(self, views: Sequence[Tensor]) -> Tensor:
        """(views·batch, feat_dim) L2-normalised embeddings, view-major."""
        return F.normalize(self.projection(embed_views(self.backbone, views)), dim=1)

    def forward(self, batch: Batch, ctx: TrainContext) -> LossOutput:
        cfg = self.cfg
        self._check_views(batch)
        self.prototypes.normalize_()
        num_views, size = len(batch.views), batch.size

        embeddings = self.embed(batch.views)  # (V·B, D)
        scores = self.prototypes(embeddings).view(num_views, size, cfg.num_prototypes)
        embeddings = embeddings.detach().view(num_views, size, cfg.feat_dim)

        with torch.no_grad(), torch.autocast(device_type=embeddings.device.type, enabled=False):
            # Scores for the codes are recomputed in float32 from the detached embeddings: under bf16
            # autocast the forward's scores carry ~3 significant digits, an error that exp(s/ε) magnifies
            # by 1/ε = 20. The loss keeps the forward's scores (and their gradient).
            prototypes = self.prototypes.weight.detach().float()
            assign_embeddings = embeddings[list(cfg.crops_for_assign)].float()  # (A, B, D)
            assign_scores = assign_embeddings @ prototypes.t()  # (A, B, K)
            if self.training and self._queue_active(ctx.epoch):
                self._ensure_queue(size)
            use_queue = self._queue_ready(ctx.epoch)
            if use_queue:
                # Past embeddings scored with the *current* prototypes, placed before the batch; the
                # queue rows only widen Sinkhorn's equipartition, so only the batch's codes are kept.
                queue_scores = self.queue @ prototypes.t()  # (A, L, K)
                assign_scores = torch.cat([queue_scores, assign_scores], dim=1)
            codes = torch.stack(
                [sinkhorn(s, cfg.epsilon, cfg.sinkhorn_iterations)[-size:] for s in assign_scores]
            )  # (A, B, K)
            if self.training and self._queue_active(ctx.epoch):
                self._push_to_queue(assign_embeddings[:, batch.valid])

        loss = swav_loss(scores, codes, cfg.crops_for_assign, cfg.temperature)
        return LossOutput(loss=loss, metrics=self._metrics(codes[:, batch.valid], use_queue))

    def _check_views(self, batch: Batch) -> None:
        num_views = len(batch.views)
        if num_views < 2:
            raise ModelError(f"swav needs at least 2 views per sample, got {num_views}")
        if max(self.cfg.crops_for_assign) >= num_views:
            raise ModelError(
                f"swav crops_for_assign {self.cfg.crops_for_assign} refers to views the batch lacks "
                f"(it has {num_views}); use the global crops, e.g. (0, 1)"
            )

    def _metrics(self, codes: Tensor, used_queue: bool) -> dict[str, Tensor]:
        with torch.no_grad():
            values = code_metrics(codes.reshape(-1, codes.shape[-1]))
            values["queue_in_use"] = torch.full((), float(used_queue), device=codes.device)
        return scalar_metrics(values)

    # ------------------------------------------------------------------------------------------- queue

    def _queue_active(self, epoch: int) -> bool:
        return self.cfg.queue_length > 0 and epoch >= self.cfg.epoch_queue_starts

    def _queue_ready(self, epoch: int) -> bool:
        rows = self.queue.shape[1]
        return self._queue_active(epoch) and rows > 0 and self.queue_rows_filled >= rows

    def local_queue_length(self, local_batch: int) -> int:
        """Rows of this rank's queue: ``queue_length`` rounded down to a multiple of the global batch,
        divided among the ranks (as the original). Raises ModelError when that leaves nothing."""
        ranks = collectives.world_size()
        global_batch = local_batch * ranks
        rounded = self.cfg.queue_length - self.cfg.queue_length % global_batch
        if rounded == 0:
            raise ModelError(
                f"swav queue_length {self.cfg.queue_length} is shorter than the global batch {global_batch}; "
                "raise it to a multiple of the batch or set it to 0"
            )
        return rounded // ranks

    def _ensure_queue(self, local_batch: int) -> None:
        """Allocate the queue (empty) if it is missing or was sized for another batch or world size."""
        rows = self.local_queue_length(local_batch)
        if self.queue.shape[1] != rows:
            if self.queue.shape[1]:
                warnings.warn(
                    f"swav queue resized from {self.queue.shape[1]} to {rows} rows (batch or world size "
                    "changed); it refills before it is used again",
                    stacklevel=3,
                )
            self.queue = self.queue.new_zeros(len(self.cfg.crops_for_assign), rows, self.cfg.feat_dim)
            self.queue_rows_filled = 0
            self.queue_filled.zero_()

    def _push_to_queue(self, embeddings: Tensor) -> None:
        """FIFO: (A, n, D) newest embeddings go to the front, the oldest n rows drop off the end."""
        rows = self.queue.shape[1]
        self.queue.copy_(torch.cat([embeddings, self.queue], dim=1)[:, :rows])
        self.queue_rows_filled = min(self.queue_rows_filled + embeddings.shape[1], rows)
        self.queue_filled.fill_(self.queue_rows_filled)


def _device_type(scores: Tensor | Sequence[Tensor]) -> str:
    first = scores if isinstance(scores, Tensor) else scores[0]
    return first.device.type
