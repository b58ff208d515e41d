"""DeepCluster (Caron et al., ECCV 2018): cluster the features, train a classifier on the clusters.

Every epoch, as in the paper and its code: the extraction pass embeds every training image (eval view) with the backbone;
the features are PCA-whitened to 256 dimensions and L2-normalised; k-means (20 iterations, a fresh seed
each epoch) gives every sample a cluster; those cluster ids are the targets of a classification layer
re-created at every clustering; the epoch samples uniformly over the non-empty clusters. The plain
functions (the clustering, the sampler as per-sample repeats, pseudo-labels keyed by global index, the
classifier reset) come first, the ``DeepCluster`` method after them.

Pseudo-labels are a table indexed by the global sample index (``labels[batch.index]``), never by loader
position: the loader may shuffle, split over workers and ranks, and repeat samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterssl.errors import ModelError
from clusterssl.models.backbones import embed_views
from clusterssl.models.buffers import RuntimeShapedBuffers
from clusterssl.models.clustering import (
    KMeansResult,
    PCAWhitening,
    epoch_clustering_metrics,
    kmeans,
    pca_whiten,
)
from clusterssl.models.clustering import (
    clustering_nmi as clustering_nmi,  # re-exported: the paper's stability curve
)
from clusterssl.models.method import Method, MethodConfig, TrainContext
from clusterssl.models.metrics import scalar_metrics
from clusterssl.models.rank_zero import cluster_on_rank_zero
from clusterssl.models.types import PADDING_INDEX, Batch, LossOutput

IGNORE_LABEL = -1
"""Pseudo-label of a padded or never-assigned sample: pass ``ignore_index=IGNORE_LABEL`` to
``cross_entropy`` so that it adds nothing to the loss."""


def deepcluster_v1_clustering(
    features: Any, k: int, *, pca_dim: int = 256, seed: int = 0, niter: int = 20, **kmeans_options: Any
) -> tuple[KMeansResult, PCAWhitening]:
    """One DeepCluster v1 clustering of the bank (N, D): PCA-whitening to ``pca_dim`` dims, L2
    normalisation, k-means (``seed`` should change every epoch). Returns the k-means result (centroids in
    the whitened space; assignments row i = sample i) and the fitted whitening."""
    whitened, whitening = pca_whiten(features, dim=pca_dim)
    return kmeans(whitened, k, niter=niter, seed=seed, **kmeans_options), whitening


def uniform_cluster_repeats(assignments: Any, k: int, rng: np.random.Generator) -> np.ndarray:
    """DeepCluster's sampler for one epoch, as how many times each sample is drawn.

    assignments: (N,) cluster of each global index in [0, k); < 0 = never assigned (drawn 0 times).
    Returns repeats (N,) int64 with ``repeats.sum() == N``: each of the m non-empty clusters gets a quota
    of ⌊N/m⌋ draws, and ``N mod m`` clusters picked at random get one more, so every cluster is drawn
    about N/m times whatever its size (the guard against one giant cluster). Inside a cluster of size s
    with quota q, the members are put in a random order; member at rank j is drawn
    ``q // s + (j < q mod s)`` times. A cluster with at least q members thus gives q distinct members once
    each; a smaller one repeats every member and draws the rest with replacement, stratified so that
    no member is left out. Deterministic for a given ``rng`` state.
    """
    ids = np.asarray(assignments, dtype=np.int64).ravel()
    total = ids.size
    if ids.size and ids.max() >= k:
        raise ModelError(f"assignments go up to {ids.max()} but k={k}")
    member = ids >= 0
    sizes = np.bincount(ids[member], minlength=k)
    non_empty = np.flatnonzero(sizes > 0)
    repeats = np.zeros(total, dtype=np.int64)
    if non_empty.size == 0:
        return repeats
    quotas = np.zeros(k, dtype=np.int64)
    quotas[non_empty] = total // non_empty.size
    quotas[rng.choice(non_empty, size=total % non_empty.size, replace=False)] += 1

    # Rank of each member inside its cluster under a random order: sort by (cluster, random key).
    members = np.flatnonzero(member)
    order = members[np.lexsort((rng.random(members.size), ids[members]))]
    cluster_of_order = ids[order]
    first_of_cluster = np.concatenate(([0], np.cumsum(sizes)))[cluster_of_order]
    rank = np.arange(order.size) - first_of_cluster
    size = sizes[cluster_of_order]
    quota = quotas[cluster_of_order]
    repeats[order] = quota // size + (rank < quota % size)
    return repeats


def reset_linear_(layer: nn.Linear, generator: torch.Generator | None = None) -> nn.Linear:
    """DeepCluster's fresh classifier after each clustering: weights N(0, 0.01), bias 0. In place.

    generator: a CPU generator to draw the weights from (they are drawn on the CPU and copied to the
    layer's device), so that the draw does not depend on, nor advance, the global random state.
    """
    with torch.no_grad():
        if generator is None:
            layer.weight.normal_(0.0, 0.01)
        else:
            layer.weight.copy_(torch.empty(layer.weight.shape).normal_(0.0, 0.01, generator=generator))
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


def pseudo_labels_by_index(assignments: Any) -> Tensor:
    """(N,) int64 tensor: the pseudo-label of global index i at position i (unassigned = IGNORE_LABEL)."""
    labels = torch.as_tensor(np.asarray(assignments, dtype=np.int64)).clone()
    labels[labels < 0] = IGNORE_LABEL
    return labels


def pseudo_labels_for_batch(labels_by_index: Tensor, index: Tensor) -> Tensor:
    """(batch,) pseudo-labels of a batch looked up by its global indices; padding gets IGNORE_LABEL.
    The result lives on ``index``'s device."""
    valid = index != PADDING_INDEX
    safe_index = torch.where(valid, index, torch.zeros_like(index)).to(labels_by_index.device)
    labels = labels_by_index[safe_index].to(index.device)
    return torch.where(valid, labels, torch.full_like(labels, IGNORE_LABEL))


# ------------------------------------------------------------------------------------------- the method


@dataclass
class DeepClusterConfig(MethodConfig):
    """DeepCluster's settings; defaults are the paper's ImageNet recipe (k = 10,000, PCA to 256)."""

    name: str = field(default="deepcluster", init=False)

    num_clusters: int = 10000
    """k. The paper found ~10× the number of classes best on ImageNet (10,000 for 1,000 classes); scale
    it with the data (e.g. 50 for the 1,618 digits). Must not exceed the number of training samples."""
    pca_dim: int = 256
    """Dimensions kept by the PCA-whitening before k-means (at most the feature size and N − 1). Lower it
    for small banks, where whitening many weak directions amplifies noise (64 on the digits)."""
    kmeans_iterations: int = 20
    """Lloyd iterations per clustering (the paper's 20)."""
    kmeans_seed: int = 0
    """Base seed; epoch e clusters with seed ``kmeans_seed + e`` (a fresh seed every epoch, as the paper)."""
    uniform_sampling: bool = True
    """Draw every non-empty cluster about N / (non-empty clusters) times per epoch: the paper's guard
    against a few giant clusters. Turn off only to study that failure."""
    use_local_views: bool = False
    """Also classify the local crops (multi-crop). The paper trains on one random-resized crop per image;
    with a multi-crop spec the global crops are always used, the locals only with this option."""

    def __post_init__(self) -> None:
        for key in ("num_clusters", "pca_dim", "kmeans_iterations"):
            if getattr(self, key) < 1:
                raise ModelError(f"deepcluster: {key} must be at least 1, got {getattr(self, key)}")
        if self.kmeans_seed < 0:
            raise ModelError(f"deepcluster: kmeans_seed must be non-negative, got {self.kmeans_seed}")


class DeepCluster(RuntimeShapedBuffers, Method):
    """Backbone → ``classifier`` Linear(num_features, k), trained on the clusters of the last clustering.

    Buffers that checkpoint with the module (so a mid-epoch resume needs no re-clustering):
    ``pseudo_labels`` (N,) int64, the cluster of each global index (empty before the first clustering),
    and ``clusterings_done``. The classifier is re-initialised in place (N(0, 0.01), bias 0)
    after every clustering and its optimizer state dropped, which is what re-creating it amounts to.
    """

    name: ClassVar[str] = "deepcluster"
    config_class: ClassVar[type[MethodConfig]] = DeepClusterConfig
    runtime_buffers: ClassVar[tuple[str, ...]] = ("pseudo_labels",)

    pseudo_labels: Tensor
    clusterings_done: Tensor

    def __init__(self, backbone: nn.Module, cfg: DeepClusterConfig | None = None) -> None:
        super().__init__(backbone)
        self.cfg = cfg = cfg or DeepClusterConfig()
        self.classifier = reset_linear_(nn.Linear(int(backbone.num_features), cfg.num_clusters))
        self.register_buffer("pseudo_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("clusterings_done", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------------------------------- hooks

    def on_epoch_start(self, ctx: TrainContext) -> None:
        """Extraction → PCA-whitening + L2 → k-means → pseudo-labels by index → fresh classifier →
        uniform-over-clusters repeats for the coming epoch; logs the clustering's statistics."""
        cfg = self.cfg
        bank = ctx.extract(self.backbone, name="backbone")
        assignments = torch.full((bank.num_samples,), IGNORE_LABEL, dtype=torch.long, device=ctx.device)

        def cluster() -> dict[str, float]:
            result, _ = deepcluster_v1_clustering(
                bank.features,
                cfg.num_clusters,
                pca_dim=cfg.pca_dim,
                seed=cfg.kmeans_seed + ctx.epoch,
                niter=cfg.kmeans_iterations,
            )
            assignments.copy_(torch.from_numpy(result.assignments))
            previous = (
                self.pseudo_labels.cpu().numpy() if self.pseudo_labels.numel() == bank.num_samples else None
            )
            return epoch_clustering_metrics(
                result.assignments,
                cfg.num_clusters,
                objective=result.objective,
                labels=bank.labels,
                previous=previous,
            )

        cluster_on_rank_zero(ctx, cluster, [assignments])
        self.pseudo_labels = pseudo_labels_by_index(assignments.cpu().numpy()).to(
            self.classifier.weight.device
        )
        self.clusterings_done += 1

        # Drawn from a generator seeded by the epoch: every rank draws the same weights, and a resumed run
        # the same as an uninterrupted one (the global random state differs after a resume).
        reset_linear_(self.classifier, torch.Generator().manual_seed(cfg.kmeans_seed * 100_003 + ctx.epoch))
        ctx.reset_optimizer_state(self.classifier.parameters())

        if cfg.uniform_sampling:
            rng = np.random.default_rng([cfg.kmeans_seed, ctx.epoch])
            ctx.set_sample_repeats(uniform_cluster_repeats(assignments.cpu().numpy(), cfg.num_clusters, rng))
        else:
            ctx.set_sample_repeats(None)

    # ----------------------------------------------------------------------------------------- forward

    def views_used(self, batch: Batch) -> list[Tensor]:
        """The views classified: the global crops, plus the local ones with ``use_local_views``."""
        return list(batch.views) if self.cfg.use_local_views else batch.global_views

    def per_sample_losses(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Cross-entropy of every (view, sample) against the sample's pseudo-label.

        Returns losses (views, batch) — 0 where the target is ignored (padding, never assigned) —,
        targets (batch,) and logits (views, batch, k).
        """
        if self.pseudo_labels.numel() == 0:
            raise ModelError(
                "deepcluster has no clustering yet: on_epoch_start (extraction and k-means) must run "
                "before the first step"
            )
        views = self.views_used(batch)
        logits = self.classifier(embed_views(self.backbone, views)).view(len(views), batch.size, -1)
        targets = pseudo_labels_for_batch(self.pseudo_labels, batch.index)
        losses = F.cross_entropy(
            logits.float().flatten(0, 1),
            targets.repeat(len(views)),
            ignore_index=IGNORE_LABEL,
            reduction="none",
        ).view(len(views), batch.size)
        return losses, targets, logits

    def forward(self, batch: Batch, ctx: TrainContext) -> LossOutput:
        losses, targets, logits = self.per_sample_losses(batch)
        counted = (targets != IGNORE_LABEL).expand_as(losses)
        # Mean over the counted (view, sample) pairs, as cross_entropy(ignore_index=…) averages; a batch
        # with nothing to count (all padding) contributes a zero loss that still reaches every parameter.
        loss = losses.sum() / counted.sum().clamp_min(1)
        with torch.no_grad():
            hits = (logits.argmax(dim=-1) == targets).logical_and(counted)
            accuracy = hits.sum() / counted.sum().clamp_min(1)
        return LossOutput(loss=loss, metrics=scalar_metrics({"pseudo_label_accuracy": accuracy}))
