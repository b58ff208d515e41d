"""PCL (Li et al., "Prototypical Contrastive Learning of Unsupervised Representations", ICLR 2021).

A MoCo v2 model (query encoder, momentum encoder, queue of keys, InfoNCE) plus, after a warm-up, a
ProtoNCE term per clustering: every epoch the momentum encoder embeds the whole training set (extraction
pass, eval view), k-means runs for each k in a list, and each query is pulled towards its own centroid and
away from sampled other centroids, with per-cluster temperatures φ (the concentration). The plain
functions (φ, the InfoNCE and ProtoNCE logits, the total loss) come first, the ``PCL`` method after them.

Conventions: ``q`` are the query encoder's L2-normalised embeddings (batch, dim) and carry the gradient;
keys, the queue, centroids and φ are constants (detached here). ``index`` is the batch's global sample
index; ``models.types.PADDING_INDEX`` (-1) marks padding, which ProtoNCE leaves out (a padded sample is a
copy of a real one: counting it would weight that sample twice).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterssl.errors import ModelError
from clusterssl.models import collectives
from clusterssl.models.backbones import embed_views
from clusterssl.models.buffers import RuntimeShapedBuffers
from clusterssl.models.clustering import (
    KMeansResult,
    distances_to_centroids,
    epoch_clustering_metrics,
    multi_kmeans,
)
from clusterssl.models.ema import ema_update_, frozen_copy
from clusterssl.models.heads import NormalizedEmbedding, projection_head
from clusterssl.models.method import Method, MethodConfig, TrainContext
from clusterssl.models.metrics import scalar_metrics
from clusterssl.models.rank_zero import cluster_on_rank_zero
from clusterssl.models.types import PADDING_INDEX, Batch, LossOutput

# ------------------------------------------------------------------------------------------ concentration


def concentration(
    distances: Any, assignments: Any, k: int, alpha: float = 10.0, temperature: float = 0.2
) -> Any:
    """Per-cluster concentration φ (k,), PCL's per-prototype temperature.

    distances:   (N,) Euclidean distance of each sample to its cluster's centroid (not squared).
    assignments: (N,) cluster id of each sample in [0, k); ids < 0 (never assigned) are ignored.

    φ_c = mean(‖v − c‖ over the members of c) / log(Z_c + α), Z_c the number of members; then
      - a cluster with one member (no spread to measure) gets the largest φ among the clusters with more
        than one member;
      - an empty cluster gets that same largest φ, as in the original (which treats "at most one member"
        alike). No sample is assigned to it, so it is never a positive; it can be drawn as a negative, and
        the largest φ (the flattest logits) keeps such an uninformative prototype from dominating;
      - φ is clipped to its 10th and 90th percentiles (linear interpolation, ``numpy.percentile``);
      - φ is rescaled so that its mean equals ``temperature``.
    Degenerate inputs stay finite: if no cluster has two members every φ equals ``temperature``; clusters
    whose members all sit exactly on the centroid (φ = 0 even after clipping) get the smallest positive φ,
    so no logit is divided by zero.

    Accepts numpy arrays or torch tensors; returns float32 of the same kind (a tensor on the device of
    ``distances``).
    """
    as_torch = isinstance(distances, Tensor)
    device = distances.device if as_torch else None
    distance_array = _to_numpy(distances).astype(np.float64).ravel()
    ids = _to_numpy(assignments).astype(np.int64).ravel()
    if distance_array.shape != ids.shape:
        raise ModelError(f"distances {distance_array.shape} and assignments {ids.shape} do not match")
    if k < 1:
        raise ModelError(f"k must be at least 1, got {k}")
    if ids.size and ids.max() >= k:
        raise ModelError(f"assignments go up to {ids.max()} but k={k}")
    if not np.isfinite(distance_array).all() or (distance_array < 0).any():
        raise ModelError("distances must be finite and non-negative")
    if alpha <= -1.0:
        raise ModelError(f"alpha must be > -1 so that log(Z + alpha) > 0 for Z >= 2, got {alpha}")
    if temperature <= 0.0:
        raise ModelError(f"temperature must be positive, got {temperature}")

    member = ids >= 0
    sizes = np.bincount(ids[member], minlength=k)
    sums = np.bincount(ids[member], weights=distance_array[member], minlength=k)
    several = sizes > 1
    phi = np.zeros(k, dtype=np.float64)
    phi[several] = sums[several] / sizes[several] / np.log(sizes[several] + alpha)
    phi[~several] = phi[several].max() if several.any() else 1.0

    phi = np.clip(phi, np.percentile(phi, 10), np.percentile(phi, 90))
    positive = phi > 0
    if not positive.any():
        phi[:] = 1.0
    elif not positive.all():
        phi[~positive] = phi[positive].min()
    phi = temperature * phi / phi.mean()

    result = phi.astype(np.float32)
    return torch.from_numpy(result).to(device) if as_torch else result


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


# -------------------------------------------------------------------------------------------- prototypes


class ClusterPrototypes(NamedTuple):
    """One clustering of the training set, as ProtoNCE uses it.

    cluster_ids: (N,) int64, cluster of each global sample index.
    centroids:   (k, dim) float32, L2-normalised.
    phi:         (k,) float32 concentration (per-prototype temperature).
    """

    cluster_ids: Tensor
    centroids: Tensor
    phi: Tensor

    def to(self, device: torch.device | str) -> ClusterPrototypes:
        return ClusterPrototypes(*(t.to(device) for t in self))


def prototypes_from_kmeans(
    features: Any, result: KMeansResult, *, alpha: float = 10.0, temperature: float = 0.2
) -> ClusterPrototypes:
    """PCL's per-epoch prototypes from a k-means of the momentum features (N, D): φ from the Euclidean
    distances to the (un-normalised) centroids, as the original computes them, then L2-normalised
    centroids (the prototypes the queries are compared with)."""
    k = result.centroids.shape[0]
    distances = distances_to_centroids(features, result.centroids, result.assignments)
    phi = concentration(distances, result.assignments, k, alpha=alpha, temperature=temperature)
    centroids = F.normalize(torch.from_numpy(np.asarray(result.centroids, dtype=np.float32)), dim=1)
    return ClusterPrototypes(
        cluster_ids=torch.from_numpy(np.asarray(result.assignments, dtype=np.int64)),
        centroids=centroids,
        phi=torch.from_numpy(phi),
    )


# ---------------------------------------------------------------------------------------------- logits


def info_nce_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """MoCo's InfoNCE logits.

    q: (batch, dim) L2-normalised queries; k: (batch, dim) L2-normalised keys of the same samples (the
    positives); queue: (r, dim) past keys (the negatives). Returns logits (batch, 1 + r) =
    [q·k, q·queue] / temperature and targets (batch,) zeros (the positive is column 0).
    """
    if q.shape != k.shape or q.ndim != 2 or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ModelError(
            f"InfoNCE shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, queue {tuple(queue.shape)}"
        )
    positive = (q * k.detach()).sum(dim=1, keepdim=True)
    negative = q @ queue.detach().T
    logits = torch.cat([positive, negative], dim=1) / temperature
    targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return logits, targets


def select_prototype_columns(
    positives: Tensor, k: int, num_negatives: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Which prototypes a batch is scored against, and the target column of each sample.

    positives: (batch,) the cluster of each (real) sample. Returns
      columns (u + r,) int64: the u distinct positive clusters of the batch (sorted), then r negatives
                 drawn uniformly without replacement from the k − u clusters that are nobody's positive
                 in the batch, r = min(num_negatives, k − u);
      targets (batch,) int64: the column of each sample's own cluster.
    Each sample is thus scored against its own prototype, the other samples' prototypes and the sampled
    negatives. The original lists one column per sample (its positive), so two samples of one cluster
    see their common prototype twice, once as target and once as a negative; listing each prototype once
    removes that duplicate and changes nothing else.
    """
    unique, targets = torch.unique(positives, sorted=True, return_inverse=True)
    is_candidate = torch.ones(k, dtype=torch.bool, device=positives.device)
    is_candidate[unique] = False
    candidates = torch.nonzero(is_candidate).squeeze(1)
    count = min(int(num_negatives), int(candidates.numel()))
    generator_device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(int(candidates.numel()), generator=generator, device=generator_device)
    negatives = candidates[order[:count].to(positives.device)]
    return torch.cat([unique, negatives]), targets


def proto_nce_logits(
    q: Tensor,
    index: Tensor,
    cluster_ids: Tensor,
    centroids: Tensor,
    phi: Tensor,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """ProtoNCE logits for one clustering.

    q: (batch, dim) L2-normalised queries; index: (batch,) global sample indices (-1 = padding);
    cluster_ids: (N,) cluster of each global index; centroids: (k, dim) L2-normalised; phi: (k,).
    Padded samples are dropped: returns logits (valid, u + r) with logits[i, j] = q_i · c_j / φ_j over
    the columns of ``select_prototype_columns`` and targets (valid,) = the column of each sample's own
    centroid.
    """
    if centroids.ndim != 2 or centroids.shape[1] != q.shape[1] or phi.shape != (centroids.shape[0],):
        raise ModelError(
            f"ProtoNCE shapes: q {tuple(q.shape)}, centroids {tuple(centroids.shape)}, phi {tuple(phi.shape)}"
        )
    valid = index != PADDING_INDEX
    sample_index = index[valid].to(cluster_ids.device)
    positives = cluster_ids[sample_index].to(q.device)
    columns, targets = select_prototype_columns(positives, centroids.shape[0], num_negatives, generator)
    prototypes = centroids.detach().to(q.device)[columns]
    temperatures = phi.detach().to(q.device)[columns]
    logits = (q[valid] @ prototypes.T) / temperatures
    return logits, targets


# ------------------------------------------------------------------------------------------------ loss


class PCLLoss(NamedTuple):
    """loss: InfoNCE + mean over clusterings of ProtoNCE (scalar, with gradient); the parts detached."""

    loss: Tensor
    info_nce: Tensor
    proto_nce: Tensor
    proto_nce_per_clustering: list[Tensor]


def pcl_loss(
    q: Tensor,
    k: Tensor,
    queue: Tensor,
    index: Tensor,
    clusterings: Sequence[ClusterPrototypes],
    *,
    temperature: float = 0.2,
    num_negatives: int = 16384,
    generator: torch.Generator | None = None,
) -> PCLLoss:
    """PCL's loss for one batch: cross-entropy on the InfoNCE logits, plus the mean over ``clusterings``
    (one per k; empty during the warm-up epochs) of the cross-entropy on the ProtoNCE logits.

    q, k: (batch, dim) L2-normalised query and key embeddings; queue: (r, dim); index: (batch,) global
    indices (-1 = padding, left out of ProtoNCE; InfoNCE uses every row, as MoCo does). A batch with no
    real sample contributes zero ProtoNCE.
    """
    logits, targets = info_nce_logits(q, k, queue, temperature)
    info_nce = F.cross_entropy(logits, targets)
    per_clustering: list[Tensor] = []
    for clustering in clusterings:
        proto_logits, proto_targets = proto_nce_logits(
            q, index, clustering.cluster_ids, clustering.centroids, clustering.phi, num_negatives, generator
        )
        # Sum over the real samples divided by their count (at least 1): the mean cross-entropy, and 0 for a
        # batch of padding only, decided without reading the padding mask back to the host.
        summed = F.cross_entropy(proto_logits, proto_targets, reduction="sum")
        per_clustering.append(summed / max(proto_targets.shape[0], 1))
    proto_nce = torch.stack(per_clustering).mean() if per_clustering else q.new_zeros(())
    total = info_nce + proto_nce
    return PCLLoss(
        loss=total,
        info_nce=info_nce.detach(),
        proto_nce=proto_nce.detach(),
        proto_nce_per_clustering=[term.detach() for term in per_clustering],
    )


# ------------------------------------------------------------------------------------------- the method


@dataclass
class PCLConfig(MethodConfig):
    """PCL's settings; defaults are the paper's ImageNet recipe (MoCo v2 encoder, 200 epochs)."""

    name: str = field(default="pcl", init=False)

    hidden_dim: int = 2048
    """Width of the MoCo v2 projection MLP's hidden layer (no BatchNorm); 0 makes it one linear layer."""
    feat_dim: int = 128
    """Size of the L2-normalised embedding (queries, keys, queue, centroids)."""
    head_batch_norm: bool = False
    """BatchNorm after the projection MLP's hidden layer. MoCo v2 and PCL have none; it speeds up short
    runs on small data (SimCLR's head has it)."""
    queue_length: int = 16384
    """r, keys of past batches used as InfoNCE negatives, over all ranks; rounded down to a multiple of
    the global batch. Keep it well below the number of training samples (e.g. 1024 for the digits), or
    the queue holds stale keys of the same images."""
    temperature: float = 0.2
    """τ of InfoNCE, and the mean of the concentrations φ."""
    momentum: float = 0.999
    """EMA momentum of the momentum (key) encoder per step. 0.999 suits ImageNet's ~5,000 steps per
    epoch; lower it (0.99) for short runs on small data, where the key encoder would barely move."""
    num_clusters: tuple[int, ...] = (25000, 50000, 100000)
    """k of each clustering (ImageNet: about N/50, N/25, N/13). Scale with the data (e.g. 10, 20, 40 on the
    digits); each k must not exceed the number of training samples."""
    warmup_epochs: int = 20
    """Epochs of InfoNCE only before the first clustering: early features are too poor to cluster."""
    num_negatives: int = 16384
    """Negative prototypes sampled per batch for ProtoNCE (capped by k minus the batch's positives)."""
    alpha: float = 10.0
    """Smoothing of the concentration, φ = mean distance / log(Z + α); larger α flattens φ over sizes."""
    kmeans_iterations: int = 20
    kmeans_redo: int = 5
    """k-means restarts per clustering (the lowest objective is kept), as the original."""
    kmeans_seed: int = 0
    """Base seed; epoch e clusters with seed ``kmeans_seed + 1000 * e``."""
    use_local_views: bool = False
    """Also use the local crops as queries (each against the key of the second global crop)."""
    shuffle_bn: bool = True
    """Under DDP, shuffle the key encoder's batch across ranks (MoCo's shuffling BN), so that BatchNorm
    statistics cannot leak which key belongs to which query."""
    key_bn_splits: int = 1
    """In one process: shuffle the key batch and embed it in this many chunks, each with its own BatchNorm
    statistics (MoCo's shuffling BN emulated on one device). 1 = one chunk. Use 4–8 when a BatchNorm
    backbone trains on one device: otherwise a query and its key share the batch's statistics, a
    shortcut that the queue's keys (from other batches) lack."""

    def __post_init__(self) -> None:
        for key in (
            "feat_dim",
            "queue_length",
            "num_negatives",
            "kmeans_iterations",
            "kmeans_redo",
            "key_bn_splits",
        ):
            if getattr(self, key) < 1:
                raise ModelError(f"pcl: {key} must be at least 1, got {getattr(self, key)}")
        for key in ("hidden_dim", "warmup_epochs", "kmeans_seed"):
            if getattr(self, key) < 0:
                raise ModelError(f"pcl: {key} must be non-negative, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ModelError(f"pcl: temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ModelError(f"pcl: momentum must lie in [0, 1], got {self.momentum}")
        if not self.num_clusters or min(self.num_clusters) < 1:
            raise ModelError(f"pcl: num_clusters must list at least one k >= 1, got {self.num_clusters}")
        if len(set(self.num_clusters)) != len(self.num_clusters):
            raise ModelError(f"pcl: num_clusters must be distinct, got {self.num_clusters}")
        if self.alpha <= -1.0:
            raise ModelError(f"pcl: alpha must be > -1, got {self.alpha}")


@torch.no_grad()
def shuffled_key_forward(
    encoder: nn.Module, images: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """``encoder(images)`` with MoCo's shuffling BN under DDP; a plain call in one process.

    images (batch, 3, H, W) on every rank (equal batch sizes) → keys (batch, D) of the same samples in
    the same order. The global batch is gathered, permuted by rank 0's random permutation, each rank
    embeds its slice of the permuted batch (so its BatchNorm statistics mix samples of every rank), and the
    keys are gathered back and un-permuted. ``generator`` (CPU) draws the permutation.
    """
    if not collectives.is_distributed():
        return encoder(images)
    world, rank = collectives.world_size(), collectives.rank()
    gathered = collectives.all_gather_cat(images)
    permutation = collectives.broadcast_(
        torch.randperm(gathered.shape[0], generator=generator).to(images.device)
    )
    keys = encoder(gathered[permutation.view(world, -1)[rank]])
    all_keys = collectives.all_gather_cat(keys)
    # all_keys[p] belongs to sample permutation[p]: sample i's key sits at argsort(permutation)[i].
    return all_keys[torch.argsort(permutation).view(world, -1)[rank]]


@torch.no_grad()
def split_shuffled_forward(
    encoder: nn.Module, images: Tensor, splits: int, generator: torch.Generator | None = None
) -> Tensor:
    """``encoder(images)`` on one device with shuffling BN emulated: the batch is permuted, embedded in
    ``splits`` chunks (BatchNorm statistics per chunk), and the outputs are put back in the input order.
    images (batch, 3, H, W) → (batch, D). With ``splits = 1`` a plain call."""
    if splits <= 1 or images.shape[0] < 2:
        return encoder(images)
    permutation = torch.randperm(images.shape[0], generator=generator).to(images.device)
    chunks = [encoder(chunk) for chunk in images[permutation].chunk(splits)]
    keys = torch.empty_like(torch.cat(chunks))
    keys[permutation] = torch.cat(chunks)
    return keys


class PCL(RuntimeShapedBuffers, Method):
    """Query encoder (``backbone`` + ``projection``), momentum encoder ``key_encoder`` (its own copies,
    no gradient, EMA of the query encoder), a queue of keys, and the clusterings of the last epoch.

    Buffers that checkpoint with the module: ``queue`` (rows, feat_dim) newest first (sized by the global
    batch at the first step), and per clustering j ``cluster_ids_{j}`` (N,), ``centroids_{j}`` (k_j,
    feat_dim) unit rows and ``phi_{j}`` (k_j,); ``clustering_ready`` says whether they hold a clustering
    (False during the warm-up); ``steps_done`` counts optimizer steps. The step's random draws (negative
    prototypes, the key shuffle) are seeded by the context's global step, so that a resumed run draws what
    an uninterrupted one does. The feature extractor is the query encoder's backbone, the one the paper
    evaluates (its linear probe loads ``encoder_q``).
    """

    name: ClassVar[str] = "pcl"
    config_class: ClassVar[type[MethodConfig]] = PCLConfig

    queue: Tensor
    clustering_ready: Tensor
    steps_done: Tensor

    def __init__(self, backbone: nn.Module, cfg: PCLConfig | None = None) -> None:
        super().__init__(backbone)
        self.cfg = cfg = cfg or PCLConfig()
        in_dim = int(backbone.num_features)
        self.projection = projection_head(
            in_dim, cfg.hidden_dim, cfg.feat_dim, batch_norm=cfg.head_batch_norm
        )
        self.key_encoder = frozen_copy(NormalizedEmbedding(backbone, self.projection))
        self.register_buffer("queue", torch.zeros(0, cfg.feat_dim))
        self.register_buffer("clustering_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        for j, k in enumerate(cfg.num_clusters):
            self.register_buffer(f"cluster_ids_{j}", torch.zeros(0, dtype=torch.long))
            self.register_buffer(f"centroids_{j}", torch.zeros(k, cfg.feat_dim))
            self.register_buffer(f"phi_{j}", torch.ones(k))

    @property
    def runtime_buffers(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("queue", *(f"cluster_ids_{j}" for j in range(len(self.cfg.num_clusters))))

    def clusterings(self) -> list[ClusterPrototypes]:
        """The current clusterings, one per k (empty during the warm-up).

        Whether there is one is read from the shape of ``cluster_ids_0`` (no rows before the first
        clustering), not from ``clustering_ready``: reading a tensor's value every step would stall the
        GPU. ``clustering_ready`` is kept in step with it for the checkpoint.
        """
        if self.cluster_ids_0.numel() == 0:
            return []
        return [
            ClusterPrototypes(
                getattr(self, f"cluster_ids_{j}"), getattr(self, f"centroids_{j}"), getattr(self, f"phi_{j}")
            )
            for j in range(len(self.cfg.num_clusters))
        ]

    # ------------------------------------------------------------------------------------------- hooks

    def on_epoch_start(self, ctx: TrainContext) -> None:
        """After the warm-up: extraction with the momentum encoder → k-means per k → φ → prototypes."""
        cfg = self.cfg
        if ctx.epoch < cfg.warmup_epochs:
            return
        bank = ctx.extract(self.key_encoder, name="momentum")
        num_samples = bank.num_samples
        ids = [torch.zeros(num_samples, dtype=torch.long, device=ctx.device) for _ in cfg.num_clusters]
        centroids = [getattr(self, f"centroids_{j}") for j in range(len(cfg.num_clusters))]
        phis = [getattr(self, f"phi_{j}") for j in range(len(cfg.num_clusters))]

        def cluster() -> dict[str, float]:
            results = multi_kmeans(
                bank.features,
                list(cfg.num_clusters),
                niter=cfg.kmeans_iterations,
                nredo=cfg.kmeans_redo,
                seed=cfg.kmeans_seed + 1000 * ctx.epoch,
            )
            metrics: dict[str, float] = {}
            for j, (k, result) in enumerate(zip(cfg.num_clusters, results, strict=True)):
                prototypes = prototypes_from_kmeans(
                    bank.features, result, alpha=cfg.alpha, temperature=cfg.temperature
                )
                ids[j].copy_(prototypes.cluster_ids)
                centroids[j].copy_(prototypes.centroids)
                phis[j].copy_(prototypes.phi)
                previous = getattr(self, f"cluster_ids_{j}")
                metrics.update(
                    epoch_clustering_metrics(
                        result.assignments,
                        k,
                        objective=result.objective,
                        labels=bank.labels,
                        previous=previous.cpu().numpy() if previous.numel() == num_samples else None,
                        prefix=f"clustering/k{k}/",
                    )
                )
                metrics[f"clustering/k{k}/phi_min"] = float(prototypes.phi.min())
                metrics[f"clustering/k{k}/phi_max"] = float(prototypes.phi.max())
            return metrics

        cluster_on_rank_zero(
            ctx, cluster, [t for j in range(len(ids)) for t in (ids[j], centroids[j], phis[j])]
        )
        for j in range(len(cfg.num_clusters)):
            setattr(self, f"cluster_ids_{j}", ids[j].to(centroids[j].device))
        self.clustering_ready.fill_(True)

    def on_step_end(self, ctx: TrainContext) -> None:
        """Momentum encoder ← m · momentum encoder + (1 − m) · query encoder (BatchNorm statistics are its
        own, from its forward passes, as in MoCo)."""
        ema_update_(self.key_encoder, (self.backbone, self.projection), self.cfg.momentum, copy_buffers=False)
        self.steps_done += 1

    # ----------------------------------------------------------------------------------------- forward

    def query_views(self, batch: Batch) -> list[Tensor]:
        """The first global crop, plus the local crops with ``use_local_views``; the key is view 1."""
        return [batch.views[0], *(batch.local_views if self.cfg.use_local_views else [])]

    def forward(self, batch: Batch, ctx: TrainContext) -> LossOutput:
        cfg = self.cfg
        if len(batch.views) < 2 or batch.num_global < 2:
            raise ModelError(
                f"pcl needs two global views (query and key), got {batch.num_global} of {len(batch.views)} views"
            )
        views = self.query_views(batch)
        queries = F.normalize(self.projection(embed_views(self.backbone, views)), dim=1)
        queries = queries.view(len(views), batch.size, -1)
        generator = torch.Generator().manual_seed(cfg.kmeans_seed * 1_000_003 + ctx.step)
        with torch.no_grad():
            if cfg.shuffle_bn and collectives.is_distributed():
                keys = shuffled_key_forward(self.key_encoder, batch.views[1], generator)
            else:
                keys = split_shuffled_forward(self.key_encoder, batch.views[1], cfg.key_bn_splits, generator)
        self._ensure_queue(batch.size)
        clusterings = self.clusterings()
        parts = [
            pcl_loss(
                query,
                keys,
                self.queue,
                batch.index,
                clusterings,
                temperature=cfg.temperature,
                num_negatives=cfg.num_negatives,
                generator=generator,
            )
            for query in queries
        ]
        loss = torch.stack([part.loss for part in parts]).mean()
        metrics = {
            "info_nce": torch.stack([part.info_nce for part in parts]).mean(),
            "proto_nce": torch.stack([part.proto_nce for part in parts]).mean(),
        }
        if self.training:
            self._enqueue(keys[batch.valid], batch.valid)
        return LossOutput(loss=loss, metrics=scalar_metrics(metrics))

    # ------------------------------------------------------------------------------------------- queue

    def queue_rows(self, local_batch: int) -> int:
        """``queue_length`` rounded down to a multiple of the global batch; ModelError if that is 0."""
        global_batch = local_batch * collectives.world_size()
        rows = self.cfg.queue_length - self.cfg.queue_length % global_batch
        if rows == 0:
            raise ModelError(
                f"pcl queue_length {self.cfg.queue_length} is shorter than the global batch {global_batch}; "
                "raise it to a multiple of the batch"
            )
        return rows

    def _ensure_queue(self, local_batch: int) -> None:
        """Allocate the queue if missing or sized for another batch: random unit vectors (as MoCo), from a
        fixed seed so that every rank starts with the same queue."""
        rows = self.queue_rows(local_batch)
        if self.queue.shape[0] == rows:
            return
        if self.queue.shape[0]:
            warnings.warn(
                f"pcl queue resized from {self.queue.shape[0]} to {rows} rows (batch or world size changed)",
                stacklevel=3,
            )
        generator = torch.Generator().manual_seed(0)
        fresh = F.normalize(torch.randn(rows, self.cfg.feat_dim, generator=generator), dim=1)
        self.queue = fresh.to(self.queue.device, self.queue.dtype)

    @torch.no_grad()
    def _enqueue(self, keys: Tensor, valid: Tensor) -> None:
        """FIFO, newest first: the keys of every rank's real samples go to the front, the oldest rows drop
        off the end. keys (real, D) of this rank; valid (batch,) this rank's real-sample mask."""
        # Ranks may hold different numbers of real samples: gather fixed-size padded blocks and a mask.
        padded = keys.new_zeros(valid.shape[0], keys.shape[1])
        padded[: keys.shape[0]] = keys
        count = torch.arange(valid.shape[0], device=valid.device) < keys.shape[0]
        gathered = collectives.all_gather_cat(padded)[collectives.all_gather_cat(count.to(keys.device))]
        rows = self.queue.shape[0]
        # A new tensor, not an in-place copy: this step's logits saved the old queue for backward.
        self.queue = torch.cat([gathered.to(self.queue.dtype), self.queue])[:rows]
