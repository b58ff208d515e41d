"""PCL's concentration, InfoNCE and ProtoNCE logits and loss (models/pcl.py), against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import FakeContext, TinyBackbone, optimizer_step

from clusterssl.errors import ModelError
from clusterssl.models.clustering import KMeansResult, distances_to_centroids, multi_kmeans
from clusterssl.models.pcl import (
    PCL,
    ClusterPrototypes,
    PCLConfig,
    concentration,
    info_nce_logits,
    pcl_loss,
    proto_nce_logits,
    prototypes_from_kmeans,
    select_prototype_columns,
    split_shuffled_forward,
)
from clusterssl.models.types import Batch

# ------------------------------------------------------------------------------------- concentration


def test_concentration_by_hand_with_clipping_at_both_ends() -> None:
    """Four clusters, every one with several members, alpha = 10, temperature = 0.2.

    cluster 0: distances 1, 3     → mean 2, Z = 2 → φ = 2 / ln 12 ≈ 0.804859
    cluster 1: distances 4, 6, 8  → mean 6, Z = 3 → φ = 6 / ln 13 ≈ 2.339227
    cluster 2: distances 1, 1, 1, 1 → mean 1, Z = 4 → φ = 1 / ln 14 ≈ 0.378923
    cluster 3: distances 10, 30   → mean 20, Z = 2 → φ = 20 / ln 12 ≈ 8.048592
    Sorted: 0.378923, 0.804859, 2.339227, 8.048592. With 4 values the 10th percentile sits at position
    0.3 (0.378923 + 0.3 × 0.425936 ≈ 0.506704) and the 90th at 2.7 (2.339227 + 0.7 × 5.709365 ≈ 6.335783).
    Clipped: 0.804859, 2.339227, 0.506704, 6.335783; mean ≈ 2.496643; φ = 0.2 × clipped / mean.
    """
    distances = np.array([1, 3, 4, 6, 8, 1, 1, 1, 1, 10, 30], dtype=np.float64)
    assignments = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3])
    raw = [2 / math.log(12), 6 / math.log(13), 1 / math.log(14), 20 / math.log(12)]
    ordered = sorted(raw)
    low = ordered[0] + 0.3 * (ordered[1] - ordered[0])
    high = ordered[2] + 0.7 * (ordered[3] - ordered[2])
    clipped = [min(max(value, low), high) for value in raw]
    expected = [0.2 * value / (sum(clipped) / 4) for value in clipped]
    assert low == pytest.approx(0.506704, abs=1e-6) and high == pytest.approx(6.335783, abs=1e-6)
    assert expected == pytest.approx([0.064475, 0.187390, 0.040591, 0.507544], abs=1e-6)

    phi = concentration(distances, assignments, 4, alpha=10, temperature=0.2)
    assert phi.dtype == np.float32 and phi.shape == (4,)
    np.testing.assert_allclose(phi, expected, rtol=1e-6)
    assert phi.mean() == pytest.approx(0.2, rel=1e-6)


def test_concentration_single_member_and_empty_clusters_get_the_largest() -> None:
    """cluster 0: 1, 3 → 2 / ln 12 ≈ 0.804859; cluster 1: one member (0.5) and cluster 2: empty → both
    take the largest φ of the clusters with several members, cluster 3: 4, 6, 8 → 6 / ln 13 ≈ 2.339227.
    The sample assigned -1 (distance 1000) is ignored. Raw: 0.804859, 2.339227, 2.339227, 2.339227;
    10th percentile at position 0.3: 0.804859 + 0.3 × 1.534368 ≈ 1.265170; the 90th is 2.339227.
    Clipped: 1.265170, 2.339227 × 3; mean ≈ 2.070713; φ = 0.2 × clipped / mean."""
    distances = np.array([1, 3, 0.5, 4, 6, 8, 1000])
    assignments = np.array([0, 0, 1, 3, 3, 3, -1])
    phi_0, phi_3 = 2 / math.log(12), 6 / math.log(13)
    low = phi_0 + 0.3 * (phi_3 - phi_0)
    clipped = [low, phi_3, phi_3, phi_3]
    expected = [0.2 * value / (sum(clipped) / 4) for value in clipped]
    assert expected == pytest.approx([0.122197, 0.225934, 0.225934, 0.225934], abs=1e-6)
    np.testing.assert_allclose(concentration(distances, assignments, 4), expected, rtol=1e-6)


def test_concentration_torch_in_torch_out_and_degenerate_cases() -> None:
    distances = torch.tensor([1.0, 3.0, 4.0, 6.0, 8.0, 1.0, 1.0, 1.0, 1.0, 10.0, 30.0])
    assignments = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3])
    phi = concentration(distances, assignments, 4)
    assert isinstance(phi, torch.Tensor) and phi.dtype == torch.float32
    np.testing.assert_allclose(phi.numpy(), concentration(distances.numpy(), assignments.numpy(), 4))
    # Every cluster a singleton: no spread anywhere, every φ is the temperature.
    np.testing.assert_allclose(concentration(np.ones(5), np.arange(5), 5, temperature=0.3), 0.3)
    # Members exactly on their centroids in most clusters: no zero φ (no division by zero downstream).
    phi = concentration(np.array([0, 0, 0, 0, 0, 0, 2, 4.0]), np.array([0, 0, 1, 1, 2, 2, 3, 3]), 4)
    assert (phi > 0).all() and phi.mean() == pytest.approx(0.2)
    with pytest.raises(ModelError, match="assignments go up to 4 but k=4"):
        concentration(np.ones(2), np.array([0, 4]), 4)


def test_prototypes_from_kmeans_uses_raw_distances_and_unit_centroids() -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, 3)).astype(np.float32)
    assignments = np.repeat(np.arange(4), 10)
    centroids = np.stack([features[assignments == c].mean(0) for c in range(4)]).astype(np.float32)
    result = KMeansResult(centroids, assignments, 0.0)
    prototypes = prototypes_from_kmeans(features, result, temperature=0.1)
    np.testing.assert_allclose(prototypes.centroids.norm(dim=1).numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        prototypes.centroids.numpy(), centroids / np.linalg.norm(centroids, axis=1, keepdims=True), rtol=1e-5
    )
    expected_phi = concentration(
        distances_to_centroids(features, centroids, assignments), assignments, 4, 10, 0.1
    )
    np.testing.assert_allclose(prototypes.phi.numpy(), expected_phi)
    np.testing.assert_array_equal(prototypes.cluster_ids.numpy(), assignments)


# ------------------------------------------------------------------------------------------- InfoNCE


def test_info_nce_logits_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]], requires_grad=True)
    queue = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])
    logits, targets = info_nce_logits(q, k, queue, temperature=0.5)
    expected = torch.tensor([[0.6, 1.0, -1.0, 0.0], [1.0, 0.0, 0.0, -1.0]]) / 0.5
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(targets, torch.zeros(2, dtype=torch.long))
    F.cross_entropy(logits, targets).backward()
    assert q.grad is not None and k.grad is None  # keys are constants (momentum encoder)


# ------------------------------------------------------------------------------------------ ProtoNCE


def test_proto_nce_logits_by_hand() -> None:
    """One sample (index 1, cluster 0) and a padded row; three prototypes, two negatives asked for.
    q = (1, 0); c0 = (1, 0), c1 = (0, 1), c2 = (-1, 0); φ = 0.5, 0.25, 0.2. The positive column is c0
    with logit 1 / 0.5 = 2; the negatives are c1 (0 / 0.25 = 0) and c2 (-1 / 0.2 = -5) in drawn order."""
    q = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    index = torch.tensor([1, -1])
    cluster_ids = torch.tensor([2, 0, 1])
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    phi = torch.tensor([0.5, 0.25, 0.2])
    logits, targets = proto_nce_logits(
        q, index, cluster_ids, centroids, phi, 2, torch.Generator().manual_seed(0)
    )
    columns, _ = select_prototype_columns(torch.tensor([0]), 3, 2, torch.Generator().manual_seed(0))
    assert columns[0] == 0 and sorted(columns[1:].tolist()) == [1, 2]
    by_column = {0: 2.0, 1: 0.0, 2: -5.0}
    torch.testing.assert_close(logits, torch.tensor([[by_column[int(c)] for c in columns]]))
    torch.testing.assert_close(targets, torch.tensor([0]))


def _random_setup(seed: int, num_samples: int = 64, k: int = 20, dim: int = 8, batch: int = 12):
    gen = torch.Generator().manual_seed(seed)
    cluster_ids = torch.randint(0, k, (num_samples,), generator=gen)
    centroids = F.normalize(torch.randn(k, dim, generator=gen), dim=1)
    phi = 0.05 + torch.rand(k, generator=gen)
    q = F.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    index = torch.randperm(num_samples, generator=gen)[:batch]
    index[torch.randperm(batch, generator=gen)[:2]] = -1  # two padded rows
    return q, index, cluster_ids, centroids, phi


@pytest.mark.parametrize("seed", range(8))
def test_proto_nce_negatives_exclude_batch_positives_and_logits_match(seed: int) -> None:
    q, index, cluster_ids, centroids, phi = _random_setup(seed)
    num_negatives = 6
    logits, targets = proto_nce_logits(
        q, index, cluster_ids, centroids, phi, num_negatives, torch.Generator().manual_seed(seed)
    )
    valid = index >= 0
    positives = cluster_ids[index[valid]]
    columns, column_targets = select_prototype_columns(
        positives, 20, num_negatives, torch.Generator().manual_seed(seed)
    )
    distinct_positives = set(positives.tolist())
    negatives = columns[len(distinct_positives) :].tolist()
    assert set(columns[: len(distinct_positives)].tolist()) == distinct_positives
    assert not distinct_positives & set(negatives)  # never a positive of the batch
    assert len(set(negatives)) == len(negatives) == min(num_negatives, 20 - len(distinct_positives))
    # Own centroid as target; every logit q·c/φ by hand.
    torch.testing.assert_close(targets, column_targets)
    assert torch.equal(columns[targets], positives)
    assert logits.shape == (int(valid.sum()), columns.numel())
    for row, sample in enumerate(q[valid]):
        for col, cluster in enumerate(columns.tolist()):
            expected = float(sample @ centroids[cluster]) / float(phi[cluster])
            assert float(logits[row, col]) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_proto_nce_negatives_are_uniform_over_the_other_clusters() -> None:
    positives = torch.tensor([0, 3, 3])
    generator = torch.Generator().manual_seed(0)
    counts = np.zeros(6)
    draws = 3000
    for _ in range(draws):
        columns, _ = select_prototype_columns(positives, 6, 2, generator)
        counts[columns[2:].numpy()] += 1
    assert counts[0] == counts[3] == 0
    # Each of the 4 other clusters is drawn with probability 2/4 per batch.
    np.testing.assert_allclose(counts[[1, 2, 4, 5]] / draws, 0.5, atol=0.04)


def test_pcl_loss_is_info_nce_plus_mean_proto_nce() -> None:
    q, index, cluster_ids, centroids, phi = _random_setup(0)
    q.requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    k = F.normalize(q.detach() + 0.1 * torch.randn(q.shape, generator=gen), dim=1)
    queue = F.normalize(torch.randn(30, 8, generator=gen), dim=1)
    second = ClusterPrototypes(cluster_ids % 5, F.normalize(torch.randn(5, 8, generator=gen), dim=1), phi[:5])
    clusterings = [ClusterPrototypes(cluster_ids, centroids, phi), second]

    out = pcl_loss(
        q,
        k,
        queue,
        index,
        clusterings,
        temperature=0.2,
        num_negatives=4,
        generator=torch.Generator().manual_seed(7),
    )
    info = F.cross_entropy(*info_nce_logits(q, k, queue, 0.2))
    replay = torch.Generator().manual_seed(7)
    protos = [
        F.cross_entropy(*proto_nce_logits(q, index, c.cluster_ids, c.centroids, c.phi, 4, replay))
        for c in clusterings
    ]
    torch.testing.assert_close(out.info_nce, info.detach())
    torch.testing.assert_close(out.proto_nce_per_clustering[0], protos[0].detach())
    torch.testing.assert_close(out.proto_nce_per_clustering[1], protos[1].detach())
    torch.testing.assert_close(out.loss, info + (protos[0] + protos[1]) / 2)
    out.loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()

    # Warm-up (no clustering yet): InfoNCE alone.
    warm = pcl_loss(q, k, queue, index, [], temperature=0.2)
    torch.testing.assert_close(warm.loss, info)


def test_padded_rows_do_not_count_in_proto_nce() -> None:
    q, index, cluster_ids, centroids, phi = _random_setup(3)
    clustering = [ClusterPrototypes(cluster_ids, centroids, phi)]
    queue = F.normalize(torch.randn(10, 8), dim=1)
    real = index >= 0
    with_padding = pcl_loss(q, q, queue, index, clustering, generator=torch.Generator().manual_seed(0))
    without = pcl_loss(
        q[real], q[real], queue, index[real], clustering, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(with_padding.proto_nce, without.proto_nce)
    # A batch of padding only: no ProtoNCE term (and no NaN).
    only_padding = pcl_loss(q, q, queue, torch.full_like(index, -1), clustering)
    assert float(only_padding.proto_nce) == 0.0 and torch.isfinite(only_padding.loss)


# ------------------------------------------------------------------------------------------- the method

NUM_SAMPLES = 30


def _pcl(warmup_epochs: int = 1, num_negatives: int = 100, seed: int = 0) -> tuple[PCL, FakeContext]:
    torch.manual_seed(seed)
    cfg = PCLConfig(
        hidden_dim=16,
        feat_dim=4,
        queue_length=20,
        momentum=0.9,
        num_clusters=(3, 5),
        warmup_epochs=warmup_epochs,
        num_negatives=num_negatives,
        kmeans_redo=2,
        temperature=0.2,
    )
    images = torch.randn(NUM_SAMPLES, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    ctx = FakeContext(num_samples=NUM_SAMPLES, images=images, labels=torch.arange(NUM_SAMPLES) % 3)
    return PCL(TinyBackbone(num_features=8), cfg), ctx


def _two_views(images: torch.Tensor, index: torch.Tensor, seed: int = 1) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    base = images[torch.where(index >= 0, index, torch.zeros_like(index))]
    views = [base + 0.1 * torch.randn(base.shape, generator=generator) for _ in range(2)]
    return Batch(views=views, labels=None, index=index, num_global=2)


def test_proto_nce_only_after_the_warmup() -> None:
    method, ctx = _pcl(warmup_epochs=1)
    assert ctx.images is not None
    batch = _two_views(ctx.images, torch.arange(6))
    method.on_epoch_start(ctx)  # epoch 0 < warm-up: no extraction, no clustering
    assert ctx.extracted == [] and method.clusterings() == [] and ctx.logged == []
    out = method(batch, ctx)
    assert out.metrics["proto_nce"] == 0.0
    assert out.loss.item() == pytest.approx(out.metrics["info_nce"].item(), rel=1e-6)

    ctx.epoch = 1
    method.on_epoch_start(ctx)
    assert ctx.extracted == ["momentum"] and len(method.clusterings()) == 2
    out = method(batch, ctx)
    assert out.metrics["proto_nce"] > 0.0
    assert out.loss.item() == pytest.approx(
        (out.metrics["info_nce"] + out.metrics["proto_nce"]).item(), rel=1e-5
    )
    assert {"clustering/k3/nmi", "clustering/k5/nmi", "clustering/k5/phi_max"} <= ctx.logged[-1].keys()


def test_clusterings_are_kmeans_of_the_momentum_features_with_concentration() -> None:
    method, ctx = _pcl(warmup_epochs=0)
    ctx.epoch = 2
    method.on_epoch_start(ctx)
    with torch.no_grad():
        features = method.key_encoder.eval()(ctx.images).numpy()
    results = multi_kmeans(features, [3, 5], niter=20, nredo=2, seed=2000)
    for clustering, result in zip(method.clusterings(), results, strict=True):
        expected = prototypes_from_kmeans(features, result, alpha=10.0, temperature=0.2)
        torch.testing.assert_close(clustering.cluster_ids, expected.cluster_ids)
        torch.testing.assert_close(clustering.centroids, expected.centroids)
        torch.testing.assert_close(clustering.phi, expected.phi)
        assert clustering.phi.mean().item() == pytest.approx(0.2, rel=1e-5)


def test_loss_equals_info_nce_plus_mean_proto_nce_by_hand() -> None:
    """Every other prototype is a negative (num_negatives ≥ k), so the logits are fixed: replay them."""
    method, ctx = _pcl(warmup_epochs=0, num_negatives=100)
    assert ctx.images is not None
    method.on_epoch_start(ctx)
    index = torch.tensor([3, 11, -1, 25])
    batch = _two_views(ctx.images, index)
    method.eval()  # no queue update: the queue the loss saw is still there to replay with
    loss = method(batch, ctx).loss.detach()
    with torch.no_grad():
        q = F.normalize(method.projection(method.backbone(batch.views[0])), dim=1)
        k = method.key_encoder(batch.views[1])
    tau = 0.2
    info = []
    for row in range(4):  # InfoNCE over every row (padding included, as MoCo)
        logits = [float(q[row] @ k[row]) / tau] + [float(q[row] @ key) / tau for key in method.queue]
        info.append(math.log(sum(math.exp(x) for x in logits)) - logits[0])
    protos = []
    for clustering in method.clusterings():
        terms = []
        for row, sample in enumerate(index.tolist()):
            if sample < 0:
                continue
            logits = [
                float(q[row] @ c) / float(phi)
                for c, phi in zip(clustering.centroids, clustering.phi, strict=True)
            ]
            own = int(clustering.cluster_ids[sample])
            terms.append(math.log(sum(math.exp(x) for x in logits)) - logits[own])
        protos.append(sum(terms) / len(terms))
    assert float(loss) == pytest.approx(sum(info) / 4 + sum(protos) / len(protos), rel=1e-5)


def test_queue_is_fifo_of_the_real_keys() -> None:
    method, ctx = _pcl()
    assert ctx.images is not None
    method.train()
    index = torch.tensor([0, 1, -1, 3, 4])
    captured: list[torch.Tensor] = []
    handle = method.key_encoder.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    method(_two_views(ctx.images, index), ctx)
    first_keys = captured[-1]
    queue = method.queue.clone()
    assert queue.shape == (20, 4)  # 20 is a multiple of the batch of 5
    torch.testing.assert_close(queue[:4], first_keys[[0, 1, 3, 4]])
    method(_two_views(ctx.images, torch.tensor([5, 6, 7, 8, 9]), seed=2), ctx)
    handle.remove()
    torch.testing.assert_close(method.queue[:5], captured[-1])
    torch.testing.assert_close(method.queue[5:], queue[:15])  # the oldest 5 rows dropped off the end
    # Queue rows start as unit vectors, like every key.
    np.testing.assert_allclose(method.queue.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_momentum_encoder_follows_the_ema_formula_and_gets_no_gradient() -> None:
    method, ctx = _pcl()
    assert ctx.images is not None
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    keys_before = [p.detach().clone() for p in method.key_encoder.parameters()]
    optimizer_step(method, _two_views(ctx.images, torch.arange(5)), optimizer, ctx)
    query = list(method.backbone.parameters()) + list(method.projection.parameters())
    for key, old, current in zip(method.key_encoder.parameters(), keys_before, query, strict=True):
        assert key.grad is None and not key.requires_grad
        torch.testing.assert_close(key, 0.9 * old + 0.1 * current.detach())
    assert not torch.equal(keys_before[0], next(method.key_encoder.parameters()))


def test_state_comes_back_from_a_checkpoint_and_features_are_the_query_backbone() -> None:
    method, ctx = _pcl(warmup_epochs=0)
    assert ctx.images is not None
    method.on_epoch_start(ctx)
    method(_two_views(ctx.images, torch.arange(5)), ctx)
    fresh, _ = _pcl(warmup_epochs=0, seed=1)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.queue, method.queue) and bool(fresh.clustering_ready)
    for mine, theirs in zip(fresh.clusterings(), method.clusterings(), strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert torch.equal(a, b)
    assert method.feature_extractor() is method.backbone


def test_queue_shorter_than_the_batch_is_a_clear_error() -> None:
    method, ctx = _pcl()
    assert ctx.images is not None
    method.cfg.queue_length = 4
    with pytest.raises(ModelError, match="queue_length 4 is shorter than the global batch 5"):
        method(_two_views(ctx.images, torch.arange(5)), ctx)


def test_split_shuffled_key_forward_gives_each_sample_its_own_key() -> None:
    """Eval mode: a per-sample function, so the shuffled chunked forward equals the plain one. Train mode
    with BatchNorm: each key is normalised with the statistics of the chunk its sample was shuffled into."""
    images = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(TinyBackbone(num_features=6), torch.nn.BatchNorm1d(6, affine=False))
    encoder.eval()
    torch.testing.assert_close(
        split_shuffled_forward(encoder, images, 4, torch.Generator().manual_seed(1)), encoder(images)
    )
    encoder.train()
    keys = split_shuffled_forward(encoder, images, 3, torch.Generator().manual_seed(1))
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    features = encoder[0](images)
    for chunk in permutation.chunk(3):
        part = features[chunk]
        expected = (part - part.mean(0)) / torch.sqrt(part.var(0, unbiased=False) + 1e-5)
        torch.testing.assert_close(keys[chunk], expected, rtol=1e-4, atol=1e-5)
    # One chunk is the plain call (batch statistics of the whole batch).
    torch.testing.assert_close(split_shuffled_forward(encoder, images, 1), encoder(images))
