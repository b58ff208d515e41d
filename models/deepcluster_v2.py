"""DeepCluster-v2 (Caron et al., 2020, in the SwAV paper): DeepCluster with prototypes and a memory bank.

Per run, as in the paper's code: a memory bank holds an L2-normalised projection of every training sample, filled by
an extraction pass before training and then refreshed with each step's embeddings. At every epoch start,
spherical k-means on the bank (several heads, k = 3,000 each by default) gives centroids, which become
the prototypes (no gradient), and a cluster for every sample. The loss, for every crop and every head, is
the cross-entropy between ``softmax(z · c / τ)`` and the sample's cluster; samples never assigned are
ignored. Unlike v1 there is no classifier to re-create: the prototypes *are* the centroids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterssl.errors import ModelError
from clusterssl.models import collectives
from clusterssl.models.backbones import embed_views
from clusterssl.models.buffers import RuntimeShapedBuffers
from clusterssl.models.clustering import epoch_clustering_metrics, kmeans
from clusterssl.models.deepcluster import IGNORE_LABEL, pseudo_labels_for_batch
from clusterssl.models.heads import NormalizedEmbedding, projection_head
from clusterssl.models.method import Method, MethodConfig, TrainContext
from clusterssl.models.metrics import scalar_metrics
from clusterssl.models.rank_zero import cluster_on_rank_zero
from clusterssl.models.types import PADDING_INDEX, Batch, LossOutput


@dataclass
class DeepClusterV2Config(MethodConfig):
    """DeepCluster-v2's settings; defaults are the SwAV repository's ImageNet recipe (800 epochs)."""

    name: str = field(default="deepcluster_v2", init=False)

    hidden_dim: int = 2048
    """Width of the projection MLP's hidden layer; 0 makes the projection a single linear layer."""
    feat_dim: int = 128
    """Size of the L2-normalised projection stored in the memory bank and compared with the centroids."""
    num_prototypes: tuple[int, ...] = (3000, 3000, 3000)
    """k of each head (one clustering per head). Roughly 3× the number of classes on ImageNet; scale it
    with the data (e.g. 30 per head on the digits); each k must not exceed the number of samples."""
    temperature: float = 0.1
    """τ of ``softmax(z · c / τ)``."""
    crops_for_assign: tuple[int, ...] = (0, 1)
    """Views whose embeddings are stored in the memory bank (one bank per view); head h is clustered on
    the bank of view ``crops_for_assign[h % len(crops_for_assign)]``, as the original."""
    kmeans_iterations: int = 10
    """Spherical k-means iterations per epoch (the original's 10)."""
    kmeans_seed: int = 0
    """Base seed; head h at epoch e clusters with seed ``kmeans_seed + 1000 * e + h``."""

    def __post_init__(self) -> None:
        for key in ("feat_dim", "kmeans_iterations"):
            if getattr(self, key) < 1:
                raise ModelError(f"deepcluster_v2: {key} must be at least 1, got {getattr(self, key)}")
        if self.hidden_dim < 0 or self.kmeans_seed < 0:
            raise ModelError("deepcluster_v2: hidden_dim and kmeans_seed must be non-negative")
        if not self.num_prototypes or min(self.num_prototypes) < 1:
            raise ModelError(
                f"deepcluster_v2: num_prototypes must list at least one k >= 1, got {self.num_prototypes}"
            )
        if self.temperature <= 0:
            raise ModelError(f"deepcluster_v2: temperature must be positive, got {self.temperature}")
        if not self.crops_for_assign or len(set(self.crops_for_assign)) != len(self.crops_for_assign):
            raise ModelError(
                f"deepcluster_v2: crops_for_assign must list distinct views, got {self.crops_for_assign}"
            )
        if min(self.crops_for_assign) < 0:
            raise ModelError(
                f"deepcluster_v2: crops_for_assign must be view indices >= 0, got {self.crops_for_assign}"
            )


def deepcluster_v2_loss(
    embeddings: Tensor, prototypes: Sequence[Tensor], targets: Tensor, temperature: float
) -> Tensor:
    """Mean over heads of the cross-entropy of ``softmax(z · c_h / τ)`` against the clusters.

    embeddings: (views, batch, D) L2-normalised, with gradient; prototypes: one (k_h, D) per head
    (constants); targets: (heads, batch) cluster of each sample per head, IGNORE_LABEL for padding and
    samples never assigned. Each head's term is the mean over its counted (view, sample) pairs; a head
    with nothing to count adds 0. Computed in float32.
    """
    views = embeddings.shape[0]
    flat = embeddings.float().flatten(0, 1)
    terms = []
    for head, centroids in enumerate(prototypes):
        logits = flat @ centroids.detach().float().T / temperature
        head_targets = targets[head].repeat(views)
        losses = F.cross_entropy(logits, head_targets, ignore_index=IGNORE_LABEL, reduction="none")
        terms.append(losses.sum() / (head_targets != IGNORE_LABEL).sum().clamp_min(1))
    return torch.stack(terms).mean()


class DeepClusterV2(RuntimeShapedBuffers, Method):
    """Backbone → projection MLP → L2-normalise, scored against frozen prototypes = k-means centroids.

    Buffers that checkpoint with the module: ``memory`` (assign views, N, feat_dim), the bank of
    projections, row i for global index i; ``memory_filled`` (whether the pass before training ran);
    ``assignments`` (heads, N), the cluster of each sample per head (IGNORE_LABEL until assigned);
    ``sample_labels`` (N,) class ids from the extraction (for the logged NMI; -1 unknown); and
    ``prototypes_{h}`` (k_h, feat_dim), the unit centroids of head h. They are the same on every rank, so
    only rank 0's checkpoint holds them (``replicated_buffers``).
    """

    name: ClassVar[str] = "deepcluster_v2"
    config_class: ClassVar[type[MethodConfig]] = DeepClusterV2Config
    runtime_buffers: ClassVar[tuple[str, ...]] = ("memory", "assignments", "sample_labels")

    memory: Tensor
    memory_filled: Tensor
    assignments: Tensor
    sample_labels: Tensor

    def __init__(self, backbone: nn.Module, cfg: DeepClusterV2Config | None = None) -> None:
        super().__init__(backbone)
        self.cfg = cfg = cfg or DeepClusterV2Config()
        in_dim = int(backbone.num_features)
        self.projection = projection_head(in_dim, cfg.hidden_dim, cfg.feat_dim)
        assign = len(cfg.crops_for_assign)
        self.register_buffer("memory", torch.zeros(assign, 0, cfg.feat_dim))
        self.register_buffer("memory_filled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("assignments", torch.zeros(len(cfg.num_prototypes), 0, dtype=torch.long))
        self.register_buffer("sample_labels", torch.zeros(0, dtype=torch.long))
        for head, k in enumerate(cfg.num_prototypes):
            self.register_buffer(f"prototypes_{head}", torch.zeros(k, cfg.feat_dim))

    @property
    def prototypes(self) -> list[Tensor]:
        """The (k_h, feat_dim) unit centroids of every head."""
        return [getattr(self, f"prototypes_{head}") for head in range(len(self.cfg.num_prototypes))]

    def embedder(self) -> nn.Module:
        """images (batch, 3, H, W) → (batch, feat_dim) unit projections: what the memory bank holds."""
        return NormalizedEmbedding(self.backbone, self.projection)

    def replicated_buffers(self) -> tuple[str, ...]:
        """Every buffer: the memory takes every rank's rows each step, the clustering comes from rank 0."""
        heads = tuple(f"prototypes_{head}" for head in range(len(self.cfg.num_prototypes)))
        return ("memory", "memory_filled", "assignments", "sample_labels", *heads)

    # ------------------------------------------------------------------------------------------- hooks

    @property
    def memory_ready(self) -> bool:
        """Whether the memory bank holds the pass before training. Read from the bank's shape (it has no
        rows until then), not from ``memory_filled``: reading a tensor's value every step would stall
        the GPU. ``memory_filled`` is kept in step with it for the checkpoint."""
        return self.memory.shape[1] > 0

    def on_train_start(self, ctx: TrainContext) -> None:
        """Fill the memory bank with an extraction pass (skipped on resume: the bank is in the checkpoint).

        Under DDP the pass gathers the rows to rank 0 alone: rank 0 fills the projections and labels and
        broadcasts them, so that every rank starts with the same memory."""
        if self.memory_ready:
            return
        bank = ctx.extract(self.embedder(), name="projection")
        device = self.memory.device
        projections = torch.zeros(bank.num_samples, self.cfg.feat_dim, device=device)
        labels = torch.full((bank.num_samples,), -1, dtype=torch.long, device=device)
        if bank.holds_rows:
            features = torch.as_tensor(np.asarray(bank.features, dtype=np.float32)).to(device)
            projections.copy_(F.normalize(features, dim=1))
            if bank.labels is not None:
                labels.copy_(torch.as_tensor(np.asarray(bank.labels, dtype=np.int64)))
        collectives.broadcast_(projections)
        collectives.broadcast_(labels)
        self.memory = projections.unsqueeze(0).repeat(len(self.cfg.crops_for_assign), 1, 1)
        self.sample_labels = labels
        self.assignments = self.assignments.new_full(
            (len(self.cfg.num_prototypes), bank.num_samples), IGNORE_LABEL
        )
        self.memory_filled.fill_(True)

    def on_epoch_start(self, ctx: TrainContext) -> None:
        """Spherical k-means of the bank per head → prototypes and assignments; logs each head's statistics."""
        if not self.memory_ready:
            raise ModelError("deepcluster_v2: the memory bank is empty; on_train_start must run first")
        cfg = self.cfg
        num_samples = self.memory.shape[1]
        assignments = self.assignments.new_full((len(cfg.num_prototypes), num_samples), IGNORE_LABEL)

        def cluster() -> dict[str, float]:
            metrics: dict[str, float] = {}
            labels = self.sample_labels.cpu().numpy()
            for head, k in enumerate(cfg.num_prototypes):
                bank = self.memory[head % len(cfg.crops_for_assign)].float().cpu().numpy()
                result = kmeans(
                    bank,
                    k,
                    niter=cfg.kmeans_iterations,
                    seed=cfg.kmeans_seed + 1000 * ctx.epoch + head,
                    spherical=True,
                )
                self.prototypes[head].copy_(F.normalize(torch.from_numpy(result.centroids), dim=1))
                assignments[head].copy_(torch.from_numpy(result.assignments))
                previous = self.assignments[head].cpu().numpy()
                metrics.update(
                    epoch_clustering_metrics(
                        result.assignments,
                        k,
                        objective=result.objective,
                        labels=labels if (labels >= 0).any() else None,
                        previous=previous if (previous >= 0).any() else None,
                        prefix=f"clustering/head{head}/",
                    )
                )
            return metrics

        cluster_on_rank_zero(ctx, cluster, [*self.prototypes, assignments])
        self.assignments = assignments

    # ----------------------------------------------------------------------------------------- forward

    def forward(self, batch: Batch, ctx: TrainContext) -> LossOutput:
        cfg = self.cfg
        if not self.memory_ready:
            raise ModelError(
                "deepcluster_v2 has no clustering yet: on_train_start and on_epoch_start must run first"
            )
        if max(cfg.crops_for_assign) >= len(batch.views):
            raise ModelError(
                f"deepcluster_v2 crops_for_assign {cfg.crops_for_assign} refers to views the batch lacks "
                f"(it has {len(batch.views)}); use the global crops, e.g. (0, 1)"
            )
        views = len(batch.views)
        embeddings = F.normalize(self.projection(embed_views(self.backbone, batch.views)), dim=1)
        embeddings = embeddings.view(views, batch.size, -1)
        targets = torch.stack(
            [pseudo_labels_for_batch(head_assignments, batch.index) for head_assignments in self.assignments]
        )
        loss = deepcluster_v2_loss(embeddings, self.prototypes, targets, cfg.temperature)
        if self.training:
            self._update_memory(batch.index, embeddings.detach()[list(cfg.crops_for_assign)])
        with torch.no_grad():
            counted = targets[0] != IGNORE_LABEL
            scores = embeddings[0].detach().float() @ self.prototypes[0].T
            agreement = (scores.argmax(dim=1) == targets[0]).logical_and(
                counted
            ).sum() / counted.sum().clamp_min(1)
        return LossOutput(loss=loss, metrics=scalar_metrics({"assignment_agreement": agreement}))

    @torch.no_grad()
    def _update_memory(self, index: Tensor, embeddings: Tensor) -> None:
        """Write this step's (assign views, batch, D) embeddings at their samples' rows, over all ranks."""
        gathered_index = collectives.all_gather_cat(index.to(self.memory.device))
        gathered = collectives.all_gather_cat(embeddings.transpose(0, 1).float().contiguous())  # (B·W, A, D)
        real = gathered_index != PADDING_INDEX
        self.memory[:, gathered_index[real]] = gathered[real].transpose(0, 1).to(self.memory.dtype)
