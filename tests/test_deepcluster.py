"""DeepCluster's sampler, pseudo-labels, classifier reset and stability NMI (models/deepcluster.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import FakeContext, TinyBackbone, optimizer_step, random_batch
from sklearn.metrics import normalized_mutual_info_score
from torch import Tensor, nn

from clusterssl.errors import ModelError
from clusterssl.models.clustering import kmeans, pca_whiten
from clusterssl.models.deepcluster import (
    IGNORE_LABEL,
    DeepCluster,
    DeepClusterConfig,
    clustering_nmi,
    deepcluster_v1_clustering,
    pseudo_labels_by_index,
    pseudo_labels_for_batch,
    reset_linear_,
    uniform_cluster_repeats,
)
from clusterssl.models.types import Batch
from clusterssl.pipeline.train.trainer import RunContext


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


# ------------------------------------------------------------------------------------------- the method


def _clustered_method(num_samples: int = 48, k: int = 6, seed: int = 0) -> tuple[DeepCluster, FakeContext]:
    """A DeepCluster on TinyBackbone after one clustering of ``num_samples`` random 8-px images."""
    torch.manual_seed(seed)
    method = DeepCluster(TinyBackbone(num_features=8), DeepClusterConfig(num_clusters=k, pca_dim=4))
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_samples, 3, 8, 8, generator=generator)
    labels = torch.arange(num_samples) % 3
    ctx = FakeContext(epoch=0, num_samples=num_samples, images=images, labels=labels)
    method.on_epoch_start(ctx)
    return method, ctx


def _views_of(images: Tensor, index: Tensor) -> Batch:
    """A one-view batch whose view rows are the images of ``index`` (padding rows copy image 0)."""
    rows = torch.where(index >= 0, index, torch.zeros_like(index))
    return Batch(views=[images[rows]], labels=None, index=index, num_global=1)


def test_clustering_is_the_v1_pipeline_on_the_bank_by_index() -> None:
    method, ctx = _clustered_method()
    assert ctx.extracted == ["backbone"]
    with torch.no_grad():
        features = method.backbone(ctx.images).numpy()
    expected, _ = deepcluster_v1_clustering(features, 6, pca_dim=4, seed=0)  # kmeans_seed 0 + epoch 0
    np.testing.assert_array_equal(method.pseudo_labels.numpy(), expected.assignments)
    logged = ctx.logged[-1]
    assert logged["clustering/k"] == 6 and logged["clustering/empty_clusters"] == 0
    assert logged["clustering/objective"] == pytest.approx(expected.objective)
    assert logged["clustering/nmi"] == pytest.approx(
        normalized_mutual_info_score(ctx.labels.numpy(), expected.assignments)
    )
    assert "clustering/stability_nmi" not in logged  # nothing to compare with yet

    ctx.epoch = 1
    method.on_epoch_start(ctx)
    second, _ = deepcluster_v1_clustering(features, 6, pca_dim=4, seed=1)  # a fresh seed each epoch
    np.testing.assert_array_equal(method.pseudo_labels.numpy(), second.assignments)
    assert ctx.logged[-1]["clustering/stability_nmi"] == pytest.approx(
        clustering_nmi(expected.assignments, second.assignments)
    )
    assert int(method.clusterings_done) == 2


def test_repeats_handed_to_the_context_sum_to_n_and_balance_the_clusters() -> None:
    method, ctx = _clustered_method(num_samples=50, k=6)
    repeats = ctx.sample_repeats[-1]
    assert repeats is not None and repeats.shape == (50,) and repeats.sum() == 50
    per_cluster = np.bincount(method.pseudo_labels.numpy(), weights=repeats, minlength=6)
    assert sorted(per_cluster.tolist()) == [8, 8, 8, 8, 9, 9]  # 50 = 6 × 8 + 2

    method.cfg.uniform_sampling = False
    method.on_epoch_start(ctx)
    assert ctx.sample_repeats[-1] is None


def test_per_sample_losses_follow_the_sample_index_under_shuffling() -> None:
    method, ctx = _clustered_method()
    assert ctx.images is not None
    sequential = torch.arange(16)
    permutation = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        losses, targets, logits = method.per_sample_losses(_views_of(ctx.images, sequential))
        shuffled, shuffled_targets, _ = method.per_sample_losses(
            _views_of(ctx.images, sequential[permutation])
        )
    torch.testing.assert_close(shuffled, losses[:, permutation])
    torch.testing.assert_close(shuffled_targets, targets[permutation])
    # Each loss is the cross-entropy of the sample's logits against the cluster of its own index.
    for position in range(16):
        expected = F.cross_entropy(
            logits[0, position : position + 1], method.pseudo_labels[position : position + 1]
        )
        assert float(losses[0, position]) == pytest.approx(float(expected), rel=1e-6)
    # Padding rows count for nothing, and the loss is the mean over the real rows.
    padded = torch.tensor([4, -1, 9, -1])
    with torch.no_grad():
        padded_losses, padded_targets, _ = method.per_sample_losses(_views_of(ctx.images, padded))
        loss = method(_views_of(ctx.images, padded), ctx).loss
    assert padded_targets.tolist() == [
        int(method.pseudo_labels[4]),
        IGNORE_LABEL,
        int(method.pseudo_labels[9]),
        IGNORE_LABEL,
    ]
    assert float(padded_losses[0, 1]) == 0.0 and float(padded_losses[0, 3]) == 0.0
    torch.testing.assert_close(loss, (losses[0, 4] + losses[0, 9]) / 2)


def test_classifier_is_reinitialised_and_its_optimizer_state_dropped_every_clustering() -> None:
    method, ctx = _clustered_method()
    assert ctx.images is not None
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9)
    from clusterssl.pipeline.train.world import DistributedEnv

    trainer = SimpleNamespace(
        optimizer=optimizer,
        extract=ctx.extract,
        log_metrics=lambda *a, **k: None,
        env=DistributedEnv(),
        wait_group=None,
    )
    run_ctx = RunContext(
        epoch=0, epochs=3, step=0, steps_per_epoch=1, rank=0, world_size=1, device=torch.device("cpu"),
        num_samples=48, trainer=trainer,
    )  # fmt: skip
    for epoch in range(2):
        batch = _views_of(ctx.images, torch.arange(48))
        optimizer_step(method, batch, optimizer, ctx)
        trained = method.classifier.weight.detach().clone()
        assert float(method.classifier.bias.detach().abs().max()) > 0  # the step moved the classifier
        assert (
            method.classifier.weight in optimizer.state and method.backbone.linear.weight in optimizer.state
        )

        run_ctx.epoch = epoch + 1
        method.on_epoch_start(run_ctx)
        assert torch.equal(method.classifier.bias, torch.zeros(6))
        assert not torch.allclose(method.classifier.weight, trained)
        assert float(method.classifier.weight.detach().std()) == pytest.approx(
            0.01, rel=0.35
        )  # 48 weights only
        # The classifier's momentum is gone; the backbone keeps its own.
        assert (
            method.classifier.weight not in optimizer.state and method.classifier.bias not in optimizer.state
        )
        assert method.backbone.linear.weight in optimizer.state


def test_forward_before_any_clustering_is_a_clear_error() -> None:
    method = DeepCluster(TinyBackbone(), DeepClusterConfig(num_clusters=3))
    with pytest.raises(ModelError, match="no clustering yet"):
        method(random_batch(4, sizes=(8,), num_global=1), FakeContext())


def test_k_larger_than_the_data_is_a_clear_error() -> None:
    method = DeepCluster(TinyBackbone(), DeepClusterConfig(num_clusters=100, pca_dim=4))
    ctx = FakeContext(num_samples=20, images=torch.randn(20, 3, 8, 8))
    with pytest.raises(ModelError, match="k=100 is larger than the number of samples"):
        method.on_epoch_start(ctx)


def test_pseudo_labels_come_back_from_a_checkpoint_without_reclustering() -> None:
    method, ctx = _clustered_method()
    assert ctx.images is not None
    fresh = DeepCluster(TinyBackbone(num_features=8), DeepClusterConfig(num_clusters=6, pca_dim=4))
    fresh.load_state_dict(method.state_dict())
    torch.testing.assert_close(fresh.pseudo_labels, method.pseudo_labels)
    batch = _views_of(ctx.images, torch.arange(10))
    torch.testing.assert_close(fresh(batch, ctx).loss, method(batch, ctx).loss)
