"""DeepCluster (Caron et al., ECCV 2018) as plain functions: the per-epoch clustering of the bank, the
uniform-over-clusters sampler expressed as per-sample repeats, pseudo-labels keyed by global index, the
classifier reset and the stability NMI. The method class (backbone, head, hooks) builds on these.

Pseudo-labels are a table indexed by the global sample index (``labels[batch.index]``), never by loader
position: the loader may shuffle, split over workers and ranks, and repeat samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.clustering import KMeansResult, PCAWhitening, kmeans, pca_whiten
from models.errors import ModelError
from models.types import PADDING_INDEX

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


def reset_linear_(layer: nn.Linear) -> nn.Linear:
    """DeepCluster's fresh classifier after each clustering: weights N(0, 0.01), bias 0. In place."""
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.01)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


def clustering_nmi(previous_assignments: Any, assignments: Any) -> float:
    """NMI between two clusterings of the same samples (the paper's stability curve, Fig. 2b). Samples
    unassigned (< 0) in either are left out."""
    previous = np.asarray(previous_assignments, dtype=np.int64).ravel()
    current = np.asarray(assignments, dtype=np.int64).ravel()
    if previous.shape != current.shape:
        raise ModelError(f"clusterings of different sizes: {previous.size} and {current.size} samples")
    keep = (previous >= 0) & (current >= 0)
    if not keep.any():
        raise ModelError("no sample is assigned in both clusterings")
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(previous[keep], current[keep]))


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
