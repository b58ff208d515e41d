"""Benchmark: k-means seeding time against k, greedy k-means++ against k-means‖, in the same run.

Both seed the same seeded Gaussian mixture (``--samples`` × ``--dim``, ``--centres`` true centres) for
each k in ``--ks``; the printout gives seconds, seconds per seed and the seeding objective (sum of squared
distances of every point to its nearest seed: lower is better) of both, and the ratios. Greedy
k-means++ is the previous default (``kmeans(init="kmeans++")``'s seeding with its 32 trials per seed);
k-means‖ is ``kmeans(init="kmeans||")``'s. ``--device cuda`` seeds k-means‖ on the GPU (k-means++
stays a CPU numpy loop, as in ``kmeans``).

    clusterssl bench seeding [--ks 100,400,1600] [--json]
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import click

from clusterssl.tools.options import emit, json_option


def seeding_objective(points: Any, seeds: Any) -> float:
    """Sum over points of the squared distance to the nearest seed (float64)."""
    import torch

    from clusterssl.models.seeding import _nearest_of

    x = torch.as_tensor(points)
    distances, _ = _nearest_of(x, (x * x).sum(dim=1), torch.as_tensor(seeds, dtype=torch.long))
    return float(distances.double().sum())


def run_benchmark(
    *,
    samples: int,
    dim: int,
    centres: int,
    ks: Sequence[int],
    trials: int,
    seed: int,
    device: str,
    threads: int | None = None,
) -> dict[str, Any]:
    """``threads``: CPU threads for both seedings (numpy's BLAS and torch alike); None keeps the defaults."""
    import torch
    from threadpoolctl import threadpool_limits

    if threads is not None:
        torch.set_num_threads(threads)
    with threadpool_limits(limits=threads):
        return _measure(samples, dim, centres, ks, trials, seed, device)


def _measure(
    samples: int, dim: int, centres: int, ks: Sequence[int], trials: int, seed: int, device: str
) -> dict[str, Any]:
    import numpy as np
    import torch

    from clusterssl.models.clustering import kmeanspp_seeds
    from clusterssl.models.seeding import kmeans_parallel_seeds
    from clusterssl.tools.bench_kmeans import gaussian_mixture

    points, _ = gaussian_mixture(samples, dim, centres, 1.0, seed)
    on_device = torch.from_numpy(points).to(device)
    rows = []
    for k in ks:
        started = time.perf_counter()
        greedy = kmeanspp_seeds(points, k, np.random.default_rng(seed), n_trials=trials)
        greedy_s = time.perf_counter() - started
        started = time.perf_counter()
        parallel = kmeans_parallel_seeds(on_device, k, np.random.default_rng(seed))
        if on_device.is_cuda:
            torch.cuda.synchronize()
        parallel_s = time.perf_counter() - started
        greedy_objective = seeding_objective(points, greedy)
        parallel_objective = seeding_objective(points, parallel)
        rows.append(
            {
                "k": k,
                "kmeanspp_s": round(greedy_s, 3),
                "kmeanspp_ms_per_seed": round(1000 * greedy_s / k, 3),
                "kmeans_parallel_s": round(parallel_s, 3),
                "kmeans_parallel_ms_per_seed": round(1000 * parallel_s / k, 3),
                "speedup": round(greedy_s / parallel_s, 2),
                "objective_ratio": round(parallel_objective / greedy_objective, 4),
            }
        )
    return {
        "data": f"{samples} x {dim} float32, {centres} Gaussian centres (seed {seed})",
        "kmeanspp": f"greedy k-means++, {trials} trials per seed, numpy on the CPU",
        "kmeans_parallel": f"k-means‖, 5 rounds, oversampling 2, on {device}",
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def render(summary: Mapping[str, Any]) -> str:
    lines = [
        f"seeding on {summary['data']} ({summary['threads']} threads)",
        f"  k-means++: {summary['kmeanspp']}",
        f"  k-means‖:  {summary['kmeans_parallel']}",
        f"  {'k':>7} {'k-means++ s':>12} {'ms/seed':>8} {'k-means‖ s':>11} {'ms/seed':>8} {'speed-up':>9} "
        f"{'objective ‖/++':>15}",
    ]
    for row in summary["rows"]:
        lines.append(
            f"  {row['k']:>7} {row['kmeanspp_s']:>12.2f} {row['kmeanspp_ms_per_seed']:>8.2f} "
            f"{row['kmeans_parallel_s']:>11.2f} {row['kmeans_parallel_ms_per_seed']:>8.2f} "
            f"{row['speedup']:>8.1f}x {row['objective_ratio']:>15.3f}"
        )
    return "\n".join(lines)


@click.command()
@click.option("--samples", default=40_000, show_default=True, help="Points to seed from.")
@click.option("--dim", default=64, show_default=True)
@click.option("--centres", default=2_000, show_default=True, help="True centres of the mixture.")
@click.option("--ks", default="100,400,1600", show_default=True, help="Comma-separated k values.")
@click.option(
    "--trials", default=32, show_default=True, help="k-means++ candidates per seed (kmeans' default)."
)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Where k-means‖ runs: cpu or cuda.")
@click.option(
    "--threads",
    type=int,
    default=None,
    help="CPU threads for both (default: the libraries' own). 1 gives steadier figures on a busy machine.",
)
@json_option
def seeding_command(
    samples: int,
    dim: int,
    centres: int,
    ks: str,
    trials: int,
    seed: int,
    device: str,
    threads: int | None,
    as_json: bool,
) -> None:
    """Seeding time against k: greedy k-means++ and k-means‖ on the same data, in the same run."""
    values = [int(value) for value in ks.split(",") if value.strip()]
    summary = run_benchmark(
        samples=samples,
        dim=dim,
        centres=centres,
        ks=values,
        trials=trials,
        seed=seed,
        device=device,
        threads=threads,
    )
    emit(summary, as_json, render)
