"""``clusterssl cluster BANK_DIR --k 1000 [--k 2000 …] --out DIR``: k-means of a feature store, with plots."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from clusterssl.tools.options import emit, json_option


@click.command()
@click.argument("bank_dir")
@click.option(
    "--k",
    "ks",
    type=int,
    multiple=True,
    required=True,
    help="Number of clusters (repeat the option for several clusterings of the same bank).",
)
@click.option(
    "--out", "out_dir", required=True, help="Directory for the .npy files, plots and statistics.json."
)
@click.option(
    "--spherical",
    is_flag=True,
    help="Cosine k-means: L2-normalised features and unit centroids (DeepCluster-v2, SwAV-style banks).",
)
@click.option(
    "--l2-normalize/--no-l2-normalize",
    default=True,
    show_default=True,
    help="L2-normalise the features before k-means (as the pipeline's cluster stage does).",
)
@click.option(
    "--pca-dim",
    type=click.IntRange(min=1),
    help="PCA-whiten to this many dimensions and L2-normalise first (DeepCluster v1 uses 256).",
)
@click.option("--niter", type=click.IntRange(min=1), default=20, show_default=True, help="Lloyd iterations.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--grid-clusters",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Clusters in each image grid.",
)
@click.option(
    "--grid-images",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Images per cluster in the grid.",
)
@click.option(
    "--data",
    help="Shards to read the grid images from (default: the manifest the bank's metadata names).",
)
@json_option
def cluster(
    bank_dir: str,
    ks: tuple[int, ...],
    out_dir: str,
    spherical: bool,
    l2_normalize: bool,
    pca_dim: int | None,
    niter: int,
    seed: int,
    grid_clusters: int,
    grid_images: int,
    data: str | None,
    as_json: bool,
) -> None:
    """Cluster the feature store in BANK_DIR (from `clusterssl extract`) with faiss k-means on every row,
    for each --k. Writes k{k}_assignments.npy (row i = sample i), k{k}_centroids.npy, k{k}_sizes.png,
    k{k}_samples.png (the largest clusters, a few images each) and statistics.json (including NMI/ARI
    when the bank has labels)."""
    from clusterssl.pipeline.features.reports import cluster_bank

    report = cluster_bank(
        bank_dir,
        list(ks),
        out_dir,
        spherical=spherical,
        niter=niter,
        seed=seed,
        l2_normalize=l2_normalize,
        pca_dim=pca_dim,
        grid_clusters=grid_clusters,
        grid_images=grid_images,
        data=data,
    )
    summary = {
        "bank": bank_dir,
        "out": out_dir,
        "num_samples": report.num_samples,
        "dim": report.dim,
        "spherical": spherical,
        "l2_normalize": l2_normalize,
        "pca_dim": pca_dim,
        "niter": niter,
        "seed": seed,
        "images_from": report.images_from,
        "clusterings": {
            str(k): {
                "statistics": report.statistics[k],
                "files": {name: str(path) for name, path in report.files_by_k[k].items()},
            }
            for k in ks
        },
    }
    emit(summary, as_json, _render)


def _render(summary: Mapping[str, Any]) -> str:
    lines = [
        f"{summary['bank']}: {summary['num_samples']} samples × {summary['dim']} dims → {summary['out']}"
    ]
    for k, clustering in summary["clusterings"].items():
        stats = clustering["statistics"]
        line = (
            f"  k={k:>6}  sizes {stats['size_min']:.0f}/{stats['size_median']:.0f}/{stats['size_max']:.0f} "
            f"(min/median/max), empty {stats['empty_clusters']:.0f}, objective {stats['objective']:.4g}"
        )
        if "nmi" in stats:
            line += f", NMI {stats['nmi']:.4f}, ARI {stats['ari']:.4f}"
        lines.append(line)
    if summary["images_from"] is None:
        lines.append("  no sample grids: the bank names no readable shards (pass --data)")
    return "\n".join(lines)
