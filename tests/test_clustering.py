"""faiss k-means, empty-cluster repair, PCA whitening and clustering statistics (models/clustering.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from clusterssl.errors import ModelError
from clusterssl.models.clustering import (
    KMeansResult,
    as_feature_matrix,
    cluster_statistics,
    distances_to_centroids,
    kmeans,
    kmeanspp_seeds,
    multi_kmeans,
    nearest_centroids,
    pca_whiten,
    repair_empty_clusters,
    squared_distances_to_centroids,
)


def blobs(num_blobs: int, per_blob: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs: centres 10 units apart on the axes, noise ``spread``."""
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(num_blobs, dim, dtype=np.float32)
    labels = np.repeat(np.arange(num_blobs), per_blob)
    points = centres[labels] + spread * rng.standard_normal((labels.size, dim)).astype(np.float32)
    order = rng.permutation(labels.size)
    return points[order].astype(np.float32), labels[order]


def hand_objective(points: np.ndarray, centroids: np.ndarray, assignments: np.ndarray) -> float:
    """Sum of squared distances, one point at a time in float64: the definition, nothing shared."""
    return float(
        sum(
            ((points[i].astype(np.float64) - centroids[a].astype(np.float64)) ** 2).sum()
            for i, a in enumerate(assignments)
        )
    )


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_recovers_separable_blobs(init: str) -> None:
    points, labels = blobs(num_blobs=6, per_blob=50, dim=8, spread=0.5, seed=1)
    result = kmeans(points, 6, seed=3, init=init, nredo=3)
    assert isinstance(result, KMeansResult)
    assert result.centroids.shape == (6, 8) and result.centroids.dtype == np.float32
    assert result.assignments.shape == (300,) and result.assignments.dtype == np.int64
    # Same partition up to a renaming of the clusters: each blob maps to exactly one cluster.
    assert normalized_mutual_info_score(labels, result.assignments) == pytest.approx(1.0)
    pairs = set(zip(labels.tolist(), result.assignments.tolist(), strict=True))
    assert len(pairs) == 6
    # Every point sits at its nearest centroid.
    all_distances = ((points[:, None, :] - result.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(result.assignments, all_distances.argmin(1))


def test_objective_is_the_sum_of_squared_distances_on_all_points() -> None:
    points, _ = blobs(num_blobs=4, per_blob=40, dim=5, spread=2.0, seed=2)
    result = kmeans(points, 7, seed=0)
    expected = hand_objective(points, result.centroids, result.assignments)
    assert result.objective == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(
        distances_to_centroids(points, result.centroids, result.assignments) ** 2,
        [((points[i] - result.centroids[a]) ** 2).sum() for i, a in enumerate(result.assignments)],
        rtol=1e-5,
    )


def test_every_point_is_used_for_training() -> None:
    """3 blobs of 1,000 points, k = 3: faiss's default trains on 3 * 256 = 768 of the 3,000 points, so its
    centroids are means of subsamples (off by ~sigma/sqrt(256) = 0.06). Converged Lloyd on every point
    puts each centroid at the mean of all its members, to float32 rounding."""
    import faiss

    points, labels = blobs(num_blobs=3, per_blob=1000, dim=4, spread=1.0, seed=0)
    full_means = np.stack([points[labels == b].mean(0) for b in range(3)])
    result = kmeans(points, 3, seed=0, niter=50)
    assert normalized_mutual_info_score(labels, result.assignments) == pytest.approx(1.0)
    member_means = np.stack([points[result.assignments == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(result.centroids, member_means, atol=1e-5)

    default = faiss.Kmeans(4, 3, niter=50, seed=0)  # faiss's defaults: max_points_per_centroid=256
    default.train(points)
    gap = np.abs(np.sort(default.centroids, 0) - np.sort(full_means, 0)).max()
    assert gap > 1e-3  # the subsample shows: this test would catch a silent subsample

    # A requested subsample trains on fewer points; the assignment still covers all of them.
    subsampled = kmeans(points, 3, seed=0, niter=50, max_points_per_centroid=50)
    assert subsampled.assignments.shape == (3000,)
    assert normalized_mutual_info_score(labels, subsampled.assignments) == pytest.approx(1.0)
    subsample_member_means = np.stack([points[subsampled.assignments == c].mean(0) for c in range(3)])
    assert np.abs(subsampled.centroids - subsample_member_means).max() > 1e-3


def test_same_seed_same_result_different_seed_differs() -> None:
    rng = np.random.default_rng(7)
    points = rng.standard_normal((1000, 16)).astype(np.float32)
    first = kmeans(points, 20, seed=11)
    second = kmeans(points, 20, seed=11)
    np.testing.assert_array_equal(first.centroids, second.centroids)
    np.testing.assert_array_equal(first.assignments, second.assignments)
    assert first.objective == second.objective
    other = kmeans(points, 20, seed=12)
    assert not np.array_equal(first.assignments, other.assignments)


def test_nredo_keeps_the_best_objective() -> None:
    rng = np.random.default_rng(8)
    points = rng.standard_normal((600, 8)).astype(np.float32)
    singles = [kmeans(points, 15, seed=s, init="random").objective for s in (4, 5, 6)]
    best = kmeans(points, 15, seed=4, nredo=3, init="random")
    assert best.objective == pytest.approx(min(singles), rel=1e-12)


def test_spherical_centroids_are_unit_norm() -> None:
    rng = np.random.default_rng(9)
    points = rng.standard_normal((500, 12)).astype(np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    result = kmeans(points, 10, spherical=True, seed=0)
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
    # Assigned by the largest cosine similarity.
    np.testing.assert_array_equal(result.assignments, (points @ result.centroids.T).argmax(1))


def test_kmeans_accepts_float16_float64_and_memmap(tmp_path) -> None:
    points, _ = blobs(num_blobs=3, per_blob=30, dim=4, spread=0.3, seed=4)
    reference = kmeans(points, 3, seed=0)
    for variant in (points.astype(np.float64), np.asfortranarray(points)):
        np.testing.assert_array_equal(kmeans(variant, 3, seed=0).assignments, reference.assignments)
    half = kmeans(points.astype(np.float16), 3, seed=0)
    assert normalized_mutual_info_score(reference.assignments, half.assignments) == pytest.approx(1.0)
    path = tmp_path / "features.npy"
    np.save(path, points)
    mapped = np.load(path, mmap_mode="r")
    np.testing.assert_array_equal(kmeans(mapped, 3, seed=0).assignments, reference.assignments)


def test_kmeanspp_seeds_are_distinct_and_cover_separated_blobs() -> None:
    points, labels = blobs(num_blobs=5, per_blob=20, dim=6, spread=0.1, seed=6)
    seeds = kmeanspp_seeds(points, 5, np.random.default_rng(0))
    assert len(set(seeds.tolist())) == 5
    assert sorted(labels[seeds].tolist()) == [0, 1, 2, 3, 4]
    # With duplicates only two distinct values exist: seeds stay distinct rows anyway.
    duplicates = np.repeat(np.eye(2, 3, dtype=np.float32), 4, axis=0)
    seeds = kmeanspp_seeds(duplicates, 6, np.random.default_rng(1))
    assert len(set(seeds.tolist())) == 6


# ----------------------------------------------------------------------------------- empty clusters


def test_repair_moves_an_empty_centroid_onto_the_farthest_point() -> None:
    """Hand-worked: points 0, 1, 2, 10 on a line, centroids at 1 and 100. Nearest assignment leaves the
    centroid at 100 empty. The farthest point from its centroid (1) is 10 (distance 9); it becomes the
    new centroid, and reassignment gives {0, 1, 2} → centroid 0, {10} → centroid 1."""
    points = np.array([[0.0], [1.0], [2.0], [10.0]], dtype=np.float32)
    centroids = np.array([[1.0], [100.0]], dtype=np.float32)
    _, assignments = nearest_centroids(points, centroids)
    np.testing.assert_array_equal(assignments, [0, 0, 0, 0])
    repaired_centroids, repaired = repair_empty_clusters(points, centroids, assignments)
    np.testing.assert_array_equal(repaired, [0, 0, 0, 1])
    np.testing.assert_array_equal(repaired_centroids, [[1.0], [10.0]])
    np.testing.assert_array_equal(centroids, [[1.0], [100.0]])  # inputs untouched


def test_repair_with_duplicates_leaves_no_empty_cluster() -> None:
    """30 points at 10 distinct locations (3 copies each), k = 15: nearest-centroid assignment can fill at
    most 10 clusters (copies land together), so empties are certain; the repair still fills all 15."""
    rng = np.random.default_rng(3)
    points = np.repeat(rng.standard_normal((10, 4)).astype(np.float32), 3, axis=0)
    centroids = points[rng.choice(30, 15, replace=False)] + 0.01
    _, assignments = nearest_centroids(points, centroids)
    assert (np.bincount(assignments, minlength=15) == 0).sum() >= 5
    _, repaired = repair_empty_clusters(points, centroids, assignments)
    assert np.bincount(repaired, minlength=15).min() >= 1

    for init in ("kmeans++", "random"):
        result = kmeans(points, 15, seed=0, init=init)
        assert np.bincount(result.assignments, minlength=15).min() >= 1
        assert result.objective == pytest.approx(
            hand_objective(points, result.centroids, result.assignments), rel=1e-6, abs=1e-9
        )


def test_every_cluster_non_empty_when_k_equals_n() -> None:
    rng = np.random.default_rng(4)
    points = rng.standard_normal((25, 3)).astype(np.float32)
    result = kmeans(points, 25, seed=0)
    np.testing.assert_array_equal(np.sort(result.assignments), np.arange(25))
    assert result.objective == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("features", "k", "message"),
    [
        (np.zeros((300, 4), np.float32), 500, "k=500 is larger than the number of samples (300)"),
        (np.zeros((0, 4), np.float32), 3, "features is empty (shape (0, 4)): nothing to cluster"),
        (np.zeros((10, 4), np.float32), 0, "k=0: the number of clusters must be at least 1"),
        (np.zeros(10, np.float32), 2, "features must be a 2-D (samples, dim) array, got shape (10,)"),
    ],
)
def test_user_errors_are_one_clear_line(features: np.ndarray, k: int, message: str) -> None:
    with pytest.raises(ModelError) as raised:
        kmeans(features, k)
    assert str(raised.value) == message


def test_non_finite_features_are_refused() -> None:
    points = np.ones((50, 3), np.float32)
    points[7, 1] = np.nan
    points[9, 0] = np.inf
    with pytest.raises(
        ModelError, match=r"^features has 2 row\(s\) with NaN or infinite values \(first: row 7\)"
    ):
        kmeans(points, 2)
    too_large = np.full((5, 2), 1e300)  # finite in float64, infinite in float32
    with pytest.raises(ModelError, match="NaN or infinite"):
        as_feature_matrix(too_large)


def test_multi_kmeans_checks_every_k_first() -> None:
    points, _ = blobs(num_blobs=4, per_blob=25, dim=5, spread=0.3, seed=5)
    results = multi_kmeans(points, [2, 4, 8], seed=0)
    assert [r.centroids.shape[0] for r in results] == [2, 4, 8]
    np.testing.assert_array_equal(results[1].assignments, kmeans(points, 4, seed=0).assignments)
    with pytest.raises(ModelError, match="k=101 is larger than the number of samples"):
        multi_kmeans(points, [2, 101])


# -------------------------------------------------------------------------------------------- PCA


def test_pca_whiten_normalises_and_decorrelates() -> None:
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((20, 20)).astype(np.float32)
    points = (rng.standard_normal((2000, 20)).astype(np.float32) * np.linspace(0.1, 5, 20)) @ mixing + 3.0
    whitened, state = pca_whiten(points, dim=8)
    assert whitened.shape == (2000, 8) and whitened.dtype == np.float32 and state.dim == 8
    np.testing.assert_allclose(np.linalg.norm(whitened, axis=1), 1.0, atol=1e-5)
    before_norm = state.apply(points, normalize=False)
    np.testing.assert_allclose(np.cov(before_norm.T, bias=True), np.eye(8), atol=1e-3)
    np.testing.assert_allclose(before_norm.mean(0), 0.0, atol=1e-3)
    # The kept directions are the top principal directions: their variances match numpy's eigenvalues.
    eigenvalues = np.linalg.eigvalsh(np.cov(points.T.astype(np.float64), bias=True))[::-1][:8]
    np.testing.assert_allclose(state.variances, eigenvalues, rtol=1e-3)
    np.testing.assert_array_equal(state.apply(points), whitened)


def test_pca_whiten_clips_dim_to_the_rank() -> None:
    rng = np.random.default_rng(1)
    few = rng.standard_normal((6, 32)).astype(np.float32)  # 6 centred points span 5 directions
    whitened, state = pca_whiten(few, dim=256)
    assert state.dim == 5 and np.isfinite(whitened).all()
    np.testing.assert_allclose(np.cov(state.apply(few, normalize=False).T, bias=True), np.eye(5), atol=1e-4)
    # Rank 2 data in 16 dims, many points: two directions kept, no blow-up of rounding noise.
    flat = (rng.standard_normal((500, 2)) @ rng.standard_normal((2, 16))).astype(np.float32)
    whitened, state = pca_whiten(flat, dim=10)
    assert state.dim == 2 and np.isfinite(whitened).all()
    with pytest.raises(ModelError, match="no variance"):
        pca_whiten(np.ones((10, 4), np.float32))


# ------------------------------------------------------------------------------------- statistics


def test_cluster_statistics_by_hand() -> None:
    assignments = np.array([0, 0, 0, 1, 1, 3, -1])  # cluster 2 empty, last sample unassigned
    labels = np.array([5, 5, 5, 6, 6, 7, 7])
    stats = cluster_statistics(assignments, 4, objective=12.5, labels=labels)
    assert stats["size_min"] == 0 and stats["size_max"] == 3
    assert stats["size_median"] == 1.5  # sizes 3, 2, 0, 1
    assert stats["empty_clusters"] == 1 and stats["objective"] == 12.5 and stats["k"] == 4
    assert stats["nmi"] == pytest.approx(1.0) and stats["ari"] == pytest.approx(1.0)
    # Unknown labels (< 0) are left out; a mismatch lowers the scores.
    partial = cluster_statistics(np.array([0, 0, 1, 1]), 2, labels=np.array([0, 1, 1, -1]))
    assert partial["nmi"] == pytest.approx(normalized_mutual_info_score([0, 1, 1], [0, 0, 1]))
    assert "nmi" not in cluster_statistics(np.array([0, 1]), 2, labels=np.array([-1, -1]))
    assert "nmi" not in cluster_statistics(np.array([0, 1]), 2)


def test_squared_distances_check_their_inputs() -> None:
    with pytest.raises(ModelError, match="assignments must be in"):
        squared_distances_to_centroids(np.zeros((2, 3)), np.zeros((2, 3)), np.array([0, 2]))
