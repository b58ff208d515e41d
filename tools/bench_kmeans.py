"""Benchmark: our faiss k-means against the scikit-learn configuration a newcomer copies from tutorials.

Data: a seeded Gaussian mixture, ``--samples`` points in ``--dim`` dimensions around ``--centres`` true
centres drawn from N(0, I), each point its centre plus N(0, sigma^2 I) noise (sigma = 1: a point is about
11 units from its own centre and about 20 from the others, so the true clusters are recoverable but
random seeding leaves many of them without a seed).

Both runs cluster the same float32 array into ``--k`` clusters; both objectives are the sum of squared
distances of every point to its assigned centroid, computed by the same function
(``models.clustering.squared_distances_to_centroids``). Default configuration: 100,000 x 128, k = 1,000,
ours = ``kmeans(niter=20)`` with its defaults, scikit-learn = ``KMeans(n_clusters=1000, n_init=10,
max_iter=300)``. The scikit-learn run takes minutes on 2 cores; ``--sklearn-n-init`` and
``--sklearn-max-iter`` shorten it for a quick look (the printout says when the configuration is not the
stated one).

    python -m clusterssl.tools.bench_kmeans [--json]
    clusterssl bench kmeans [--json]
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import click

from clusterssl.tools.options import emit, json_option


def gaussian_mixture(samples: int, dim: int, centres: int, sigma: float, seed: int) -> Any:
    """(samples, dim) float32 points and (samples,) int64 true labels of a seeded isotropic mixture."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centre_points = rng.standard_normal((centres, dim), dtype=np.float32)
    labels = rng.integers(0, centres, size=samples)
    noise = rng.standard_normal((samples, dim), dtype=np.float32)
    points = centre_points[labels] + np.float32(sigma) * noise
    return np.ascontiguousarray(points, dtype=np.float32), labels


def run_benchmark(
    *,
    samples: int,
    dim: int,
    centres: int,
    sigma: float,
    k: int,
    niter: int,
    nredo: int,
    init: str,
    init_points_per_centroid: int,
    init_trials: int,
    sklearn_n_init: int,
    sklearn_max_iter: int,
    skip_sklearn: bool,
    seed: int,
) -> dict[str, Any]:
    from clusterssl.models.clustering import cluster_statistics, kmeans, squared_distances_to_centroids

    points, labels = gaussian_mixture(samples, dim, centres, sigma, seed)
    summary: dict[str, Any] = {
        "samples": samples,
        "dim": dim,
        "true_centres": centres,
        "sigma": sigma,
        "k": k,
        "ours_config": f"kmeans(niter={niter}, nredo={nredo}, init={init!r}, "
        f"init_points_per_centroid={init_points_per_centroid}, init_trials={init_trials}) on all points",
    }

    _progress(f"ours: k-means of {samples:,} x {dim} into k = {k:,} …")
    summary["load_average_before"] = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    ours = kmeans(
        points,
        k,
        niter=niter,
        nredo=nredo,
        seed=seed,
        init=init,
        init_points_per_centroid=init_points_per_centroid,
        init_trials=init_trials,
    )
    summary["ours_seconds"] = time.perf_counter() - start
    summary["ours_cpu_seconds"] = time.process_time() - cpu_start
    summary["ours_objective"] = float(
        squared_distances_to_centroids(points, ours.centroids, ours.assignments).sum(dtype="float64")
    )
    stats = cluster_statistics(ours.assignments, k, labels=labels)
    summary["ours_nmi_vs_truth"] = stats["nmi"]
    summary["ours_empty_clusters"] = int(stats["empty_clusters"])

    if skip_sklearn:
        return summary

    from sklearn.cluster import KMeans

    summary["sklearn_config"] = (
        f"KMeans(n_clusters={k}, n_init={sklearn_n_init}, max_iter={sklearn_max_iter})"
    )
    summary["sklearn_is_stated_config"] = sklearn_n_init == 10 and sklearn_max_iter == 300
    _progress(f"scikit-learn: {summary['sklearn_config']} (minutes on 2 cores) …")
    start, cpu_start = time.perf_counter(), time.process_time()
    reference = KMeans(n_clusters=k, n_init=sklearn_n_init, max_iter=sklearn_max_iter, random_state=seed)
    reference.fit(points)
    summary["sklearn_seconds"] = time.perf_counter() - start
    summary["sklearn_cpu_seconds"] = time.process_time() - cpu_start
    summary["load_average_after"] = os.getloadavg()[0]
    summary["sklearn_objective"] = float(
        squared_distances_to_centroids(points, reference.cluster_centers_, reference.labels_).sum(
            dtype="float64"
        )
    )
    summary["sklearn_nmi_vs_truth"] = cluster_statistics(reference.labels_, k, labels=labels)["nmi"]
    summary["speedup"] = summary["sklearn_seconds"] / summary["ours_seconds"]
    summary["objective_gap"] = summary["ours_objective"] / summary["sklearn_objective"] - 1.0
    return summary


def _progress(message: str) -> None:
    """Stage lines on stderr, so that ``--json`` output stays one object on stdout."""
    click.echo(message, err=True)


def _human(summary: Mapping[str, Any]) -> str:
    lines = [
        f"k-means on {summary['samples']:,} x {summary['dim']} (Gaussian mixture, "
        f"{summary['true_centres']:,} true centres, sigma {summary['sigma']}), k = {summary['k']:,}",
        f"  ours     {summary['ours_config']}",
        f"           {summary['ours_seconds']:8.2f} s   objective {summary['ours_objective']:.6e}   "
        f"NMI vs truth {summary['ours_nmi_vs_truth']:.4f}   empty clusters {summary['ours_empty_clusters']}",
    ]
    if "sklearn_seconds" in summary:
        note = "" if summary["sklearn_is_stated_config"] else "   (NOT the stated n_init=10, max_iter=300)"
        lines += [
            f"  sklearn  {summary['sklearn_config']}{note}",
            f"           {summary['sklearn_seconds']:8.2f} s   objective {summary['sklearn_objective']:.6e}   "
            f"NMI vs truth {summary['sklearn_nmi_vs_truth']:.4f}",
            f"  speed-up {summary['speedup']:.1f}x (target >= 20x)   objective gap "
            f"{100 * summary['objective_gap']:+.3f}% (target <= +1%)",
            f"  CPU seconds (all threads): ours {summary['ours_cpu_seconds']:.1f}, "
            f"sklearn {summary['sklearn_cpu_seconds']:.1f}; 1-min load average "
            f"{summary['load_average_before']:.1f} before, {summary['load_average_after']:.1f} after "
            f"on {os.cpu_count()} CPUs (other jobs on the machine slow both runs)",
        ]
    return "\n".join(lines)


@click.command("kmeans")
@click.option("--samples", default=100_000, show_default=True, help="Points in the synthetic bank.")
@click.option("--dim", default=128, show_default=True, help="Feature dimension.")
@click.option("--centres", default=1000, show_default=True, help="True centres of the Gaussian mixture.")
@click.option("--sigma", default=1.0, show_default=True, help="Noise standard deviation around each centre.")
@click.option("--k", "k", default=1000, show_default=True, help="Number of clusters asked of both.")
@click.option("--niter", default=20, show_default=True, help="Our Lloyd iterations.")
@click.option("--nredo", default=1, show_default=True, help="Our restarts (best objective kept).")
@click.option(
    "--init",
    type=click.Choice(["kmeans++", "random"]),
    default="kmeans++",
    show_default=True,
    help="Our seeding: greedy k-means++ on a subsample, or faiss's random points (the originals' choice).",
)
@click.option(
    "--init-points-per-centroid",
    default=10,
    show_default=True,
    help="Size of our k-means++ subsample per centroid; larger seeds better and costs linearly more.",
)
@click.option(
    "--init-trials",
    default=32,
    show_default=True,
    help="Candidates per k-means++ seed; more seed better (greedier) and cost linearly more.",
)
@click.option("--sklearn-n-init", default=10, show_default=True, help="scikit-learn restarts.")
@click.option(
    "--sklearn-max-iter",
    default=300,
    show_default=True,
    help="scikit-learn iteration cap. Lower it only for a quick look: the stated comparison is 300.",
)
@click.option("--skip-sklearn", is_flag=True, help="Time ours alone (tuning).")
@click.option("--seed", default=0, show_default=True, help="Seeds the data and both runs.")
@json_option
def kmeans_command(as_json: bool, **options: Any) -> None:
    """Our faiss k-means against scikit-learn KMeans(n_init=10, max_iter=300), in one run."""
    summary = run_benchmark(**options)
    emit(summary, as_json, _human)


def main(argv: list[str] | None = None) -> None:
    kmeans_command.main(args=argv, prog_name="python -m clusterssl.tools.bench_kmeans")


if __name__ == "__main__":
    main()
