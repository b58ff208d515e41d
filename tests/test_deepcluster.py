"""DeepCluster's sampler, pseudo-labels, classifier reset and stability NMI (models/deepcluster.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from models.clustering import kmeans, pca_whiten
from models.deepcluster import (
    IGNORE_LABEL,
    clustering_nmi,
    deepcluster_v1_clustering,
    pseudo_labels_by_index,
    pseudo_labels_for_batch,
    reset_linear_,
    uniform_cluster_repeats,
)
from models.errors import ModelError


def shuffled_assignments(sizes: list[int], seed: int) -> np.ndarray:
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels)


def test_uniform_repeats_by_hand() -> None:
    """Sizes 50, 3, 0, 7, 40 (N = 100, k = 5): 4 non-empty clusters, quota 100 / 4 = 25 each.
    Cluster 0 (50 members): 25 distinct members once. Cluster 1 (3): 25 = 3 × 8 + 1, so two members 8
    times and one 9 times. Cluster 3 (7): 25 = 7 × 3 + 4, four members 4 times and three 3 times.
    Cluster 4 (40): 25 distinct members once. Cluster 2: nothing to draw."""
    assignments = shuffled_assignments([50, 3, 0, 7, 40], seed=0)
    repeats = uniform_cluster_repeats(assignments, 5, np.random.default_rng(1))
    assert repeats.dtype == np.int64 and repeats.shape == (100,)
    assert repeats.sum() == 100
    per_cluster = np.bincount(assignments, weights=repeats, minlength=5)
    np.testing.assert_array_equal(per_cluster, [25, 25, 0, 25, 25])
    assert sorted(repeats[assignments == 0].tolist()) == [0] * 25 + [1] * 25
    assert sorted(repeats[assignments == 1].tolist()) == [8, 8, 9]
    assert sorted(repeats[assignments == 3].tolist()) == [3, 3, 3, 4, 4, 4, 4]
    assert sorted(repeats[assignments == 4].tolist()) == [0] * 15 + [1] * 25


def test_uniform_repeats_remainder_unassigned_and_determinism() -> None:
    """N = 103 with 4 non-empty clusters: quotas 25 and, for 103 mod 4 = 3 random clusters, 26. Samples
    never assigned (-1) are not drawn but still count in N."""
    assignments = shuffled_assignments([60, 20, 13, 9], seed=2)
    assignments = np.concatenate([assignments, [-1]])  # N = 103
    repeats = uniform_cluster_repeats(assignments, 6, np.random.default_rng(5))
    assert repeats.sum() == 103 and repeats[-1] == 0
    per_cluster = np.bincount(assignments[:-1], weights=repeats[:-1], minlength=6)
    assert sorted(per_cluster.tolist()) == [0, 0, 25, 26, 26, 26]

    again = uniform_cluster_repeats(assignments, 6, np.random.default_rng(5))
    np.testing.assert_array_equal(repeats, again)
    other = uniform_cluster_repeats(assignments, 6, np.random.default_rng(6))
    assert not np.array_equal(repeats, other)


def test_uniform_repeats_each_member_equally_likely() -> None:
    """Sizes 80 and 20 (k = 4, two clusters empty): quota 50 each. Over many epochs each member of the
    big cluster is drawn 50 / 80 = 0.625 times on average and each member of the small one
    50 / 20 = 2.5 times, whatever its position: no member is favoured."""
    assignments = shuffled_assignments([80, 20], seed=3)
    rng = np.random.default_rng(0)
    total = np.zeros(100)
    epochs = 2000
    for _ in range(epochs):
        total += uniform_cluster_repeats(assignments, 4, rng)
    expected = np.where(assignments == 0, 50 / 80, 50 / 20)
    np.testing.assert_allclose(total / epochs, expected, atol=0.05)


def test_uniform_repeats_rejects_bad_ids() -> None:
    with pytest.raises(ModelError, match="assignments go up to 7 but k=5"):
        uniform_cluster_repeats(np.array([0, 7]), 5, np.random.default_rng(0))
    np.testing.assert_array_equal(
        uniform_cluster_repeats(np.array([-1, -1]), 3, np.random.default_rng(0)), [0, 0]
    )


def test_reset_linear_draws_small_weights_and_zero_bias() -> None:
    layer = nn.Linear(512, 1000)
    torch.manual_seed(0)
    returned = reset_linear_(layer)
    assert returned is layer
    assert float(layer.weight.detach().std()) == pytest.approx(0.01, rel=0.01)
    assert abs(float(layer.weight.detach().mean())) < 1e-4
    assert torch.equal(layer.bias, torch.zeros(1000))


def test_clustering_nmi() -> None:
    previous = np.array([0, 0, 1, 1, 2, 2])
    assert clustering_nmi(previous, np.array([5, 5, 3, 3, 4, 4])) == pytest.approx(1.0)  # renamed
    assert clustering_nmi(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    # Unassigned samples (-1) in either clustering are left out.
    assert clustering_nmi(np.array([0, 0, 1, 1, -1]), np.array([1, 1, 0, 0, 0])) == pytest.approx(1.0)
    with pytest.raises(ModelError, match="different sizes"):
        clustering_nmi(previous, previous[:3])


def test_pseudo_labels_follow_the_sample_index_under_shuffling() -> None:
    assignments = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    table = pseudo_labels_by_index(assignments)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        index = torch.randperm(10, generator=generator)[:6]
        index[2] = -1  # padding
        labels = pseudo_labels_for_batch(table, index)
        for position, sample in enumerate(index.tolist()):
            assert int(labels[position]) == (IGNORE_LABEL if sample < 0 else assignments[sample])
    # Padding adds nothing to the loss.
    logits = torch.randn(3, 10)
    labels = pseudo_labels_for_batch(table, torch.tensor([0, -1, 2]))
    expected = F.cross_entropy(logits[[0, 2]], torch.tensor([3, 4]))
    torch.testing.assert_close(F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL), expected)
    assert int(pseudo_labels_by_index(np.array([2, -1]))[1]) == IGNORE_LABEL


def test_deepcluster_v1_clustering_is_whitening_then_kmeans() -> None:
    rng = np.random.default_rng(0)
    centres = 6.0 * rng.standard_normal((5, 32)).astype(np.float32)
    labels = rng.integers(0, 5, 400)
    features = centres[labels] + rng.standard_normal((400, 32)).astype(np.float32)
    result, whitening = deepcluster_v1_clustering(features, 5, pca_dim=16, seed=3)
    whitened, _ = pca_whiten(features, dim=16)
    np.testing.assert_array_equal(result.assignments, kmeans(whitened, 5, seed=3).assignments)
    assert whitening.dim == 16 and result.centroids.shape == (5, 16)
    assert normalized_mutual_info_score(labels, result.assignments) == pytest.approx(1.0)
