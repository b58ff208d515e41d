"""PCL (Li et al., "Prototypical Contrastive Learning of Unsupervised Representations", ICLR 2021) as
plain functions: the per-cluster concentration φ, the MoCo InfoNCE logits, the ProtoNCE logits with
sampled negative prototypes, and the total loss. The method class (encoders, queue, hooks) builds on these.

Conventions: ``q`` are the query encoder's L2-normalised embeddings (batch, dim) and carry the gradient;
keys, the queue, centroids and φ are constants (detached here). ``index`` is the batch's global sample
index; ``models.types.PADDING_INDEX`` (-1) marks padding, which ProtoNCE leaves out (a padded sample is a
copy of a real one: counting it would weight that sample twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.clustering import KMeansResult, distances_to_centroids
from models.errors import ModelError
from models.types import PADDING_INDEX

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
    has_real_sample = bool((index != PADDING_INDEX).any())
    for clustering in clusterings:
        if not has_real_sample:
            per_clustering.append(q.sum() * 0.0)
            continue
        proto_logits, proto_targets = proto_nce_logits(
            q, index, clustering.cluster_ids, clustering.centroids, clustering.phi, num_negatives, generator
        )
        per_clustering.append(F.cross_entropy(proto_logits, proto_targets))
    proto_nce = torch.stack(per_clustering).mean() if per_clustering else q.new_zeros(())
    total = info_nce + proto_nce
    return PCLLoss(
        loss=total,
        info_nce=info_nce.detach(),
        proto_nce=proto_nce.detach(),
        proto_nce_per_clustering=[term.detach() for term in per_clustering],
    )
