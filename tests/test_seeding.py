"""k-means‖ seeding: as good as greedy k-means++ on clustered data, deterministic per seed, a bounded
number of passes over the points whatever k is, and the `bench seeding` printout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import clusterssl.models.seeding as seeding
from clusterssl.models.clustering import kmeans, kmeanspp_seeds
from clusterssl.models.seeding import kmeans_parallel_seeds, weighted_kmeanspp
from clusterssl.tools.bench_kmeans import gaussian_mixture
from clusterssl.tools.bench_seeding import render, run_benchmark, seeding_objective


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    points, _ = gaussian_mixture(6000, 16, 150, 0.3, seed=5)
    return points


def test_objective_within_a_factor_of_greedy_kmeanspp(blobs: np.ndarray) -> None:
    k = 150
    greedy = seeding_objective(blobs, kmeanspp_seeds(blobs, k, np.random.default_rng(0), n_trials=32))
    for seed in range(3):
        seeds = kmeans_parallel_seeds(blobs, k, np.random.default_rng(seed))
        assert len(set(seeds.tolist())) == k
        assert seeding_objective(blobs, seeds) < 1.5 * greedy


def test_the_same_seed_gives_the_same_seeds(blobs: np.ndarray) -> None:
    first = kmeans_parallel_seeds(blobs, 60, np.random.default_rng(7))
    again = kmeans_parallel_seeds(blobs, 60, np.random.default_rng(7))
    other = kmeans_parallel_seeds(blobs, 60, np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    results = [kmeans(blobs, 60, seed=2, niter=5) for _ in range(2)]
    np.testing.assert_array_equal(results[0].assignments, results[1].assignments)


def test_passes_over_the_points_do_not_grow_with_k(
    blobs: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy k-means++ reads every point once per seed; k-means‖ reads them once per round."""
    passes: list[int] = []
    original = seeding._nearest_of

    def counted(x: torch.Tensor, squared_norms: torch.Tensor, picked: torch.Tensor) -> object:
        if x.shape[0] == blobs.shape[0]:
            passes.append(picked.numel())
        return original(x, squared_norms, picked)

    monkeypatch.setattr(seeding, "_nearest_of", counted)
    for k in (20, 400):
        passes.clear()
        kmeans_parallel_seeds(blobs, k, np.random.default_rng(0), rounds=5)
        assert len(passes) <= 5


def test_blocked_draws_beyond_the_sequential_cap_stay_distinct_and_good(blobs: np.ndarray) -> None:
    """Past ``max_steps`` seeds the weighted k-means++ draws blocks: k seeds in ``max_steps`` steps."""
    points = torch.from_numpy(blobs[:2000])
    weights = torch.ones(2000)
    generator = torch.Generator().manual_seed(0)
    greedy = weighted_kmeanspp(points, weights, 300, generator, max_steps=1024)
    blocked = weighted_kmeanspp(points, weights, 300, torch.Generator().manual_seed(0), max_steps=10)
    assert len(set(blocked.tolist())) == 300
    assert seeding_objective(points, blocked) < 1.5 * seeding_objective(points, greedy)


def test_duplicate_points_still_give_k_distinct_rows() -> None:
    points = np.repeat(np.eye(4, dtype=np.float32), 50, axis=0)  # 4 distinct values, 200 rows
    seeds = kmeans_parallel_seeds(points, 10, np.random.default_rng(0))
    assert len(set(seeds.tolist())) == 10
    assert {tuple(row) for row in points[seeds]} == {tuple(row) for row in np.eye(4)}


def test_bench_seeding_prints_both_seedings_per_k() -> None:
    summary = run_benchmark(samples=2000, dim=8, centres=50, ks=[10, 40], trials=4, seed=0, device="cpu")
    assert [row["k"] for row in summary["rows"]] == [10, 40]
    assert all(row["kmeanspp_s"] > 0 and row["kmeans_parallel_s"] > 0 for row in summary["rows"])
    text = render(summary)
    assert "k-means++" in text and "k-means‖" in text and len(text.splitlines()) == 6
