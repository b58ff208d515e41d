"""Clustering a memory bank on disk into files a person can look at (``clusterssl cluster``).

bank (features.npy + bank.json) → [L2 | PCA-whitening + L2] → k-means for each k →
    OUT/assignments_k{k}.npy   (N,) int64, row i = sample i
    OUT/centroids_k{k}.npy     (k, D') float32, in the space that was clustered
    OUT/sizes_k{k}.png         histogram of cluster sizes
    OUT/samples_k{k}.png       a few clusters × a few of their images, read from the shards
    OUT/clusters.json          the settings and, per k, the statistics and the files
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.memory_bank import MemoryBank

SUMMARY_FILE = "clusters.json"
THUMBNAIL_SIDE = 64
"""Side of each image in the sample grids (ImageNet-sized images are shrunk, digits enlarged)."""


def open_complete_bank(bank_dir: str | Path) -> MemoryBank:
    """The bank in ``bank_dir``, refusing a missing, empty or unfinished one with one clear line."""
    bank = MemoryBank.open(bank_dir)  # refuses a missing or empty bank
    if not bank.meta.complete:
        raise PipelineError(
            f"the memory bank at {bank_dir} is unfinished ({bank.num_written} of {bank.meta.num_samples} rows); "
            "run the same `clusterssl extract` command again to complete it"
        )
    return bank


def cluster_bank(
    bank_dir: str | Path,
    ks: Sequence[int],
    out_dir: str | Path,
    *,
    spherical: bool = False,
    pca_dim: int | None = None,
    niter: int = 20,
    seed: int = 0,
    grid_clusters: int = 8,
    grid_images: int = 8,
    data: str | Path | None = None,
) -> dict[str, Any]:
    """Cluster the bank in ``bank_dir`` for every k and write the files listed in the module docstring.

    spherical: L2-normalise the features and keep unit centroids (cosine k-means).
    pca_dim:   PCA-whiten to this many dimensions and L2-normalise first (DeepCluster's preprocessing).
    data:      the shards to read the grid images from; by default the manifest the bank's metadata names.
    Every k is checked against N before any work. Returns the summary that ``clusters.json`` holds.
    """
    from models.clustering import as_feature_matrix, cluster_statistics, multi_kmeans, pca_whiten
    from pipeline.plots import plot_cluster_sizes

    if not ks:
        raise PipelineError("give at least one --k")
    bank = open_complete_bank(bank_dir)
    num_samples = bank.meta.num_samples
    for k in ks:
        if k < 1:
            raise PipelineError(f"k={k}: the number of clusters must be at least 1")
        if k > num_samples:
            raise PipelineError(f"k={k} is larger than the number of samples in the bank ({num_samples})")
    features = as_feature_matrix(bank.features, name=f"the bank at {bank_dir}")
    if pca_dim is not None:
        features, _ = pca_whiten(features, dim=pca_dim)
    elif spherical:
        features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    labels = bank.labels if (bank.labels >= 0).any() else None
    results = multi_kmeans(features, list(ks), niter=niter, seed=seed, spherical=spherical)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid_source = _grid_source(bank, data)
    summary: dict[str, Any] = {
        "bank": str(bank_dir),
        "out": str(out),
        "num_samples": num_samples,
        "dim": int(features.shape[1]),
        "spherical": spherical,
        "pca_dim": pca_dim,
        "niter": niter,
        "seed": seed,
        "images_from": grid_source,
        "clusterings": {},
    }
    for k, result in zip(ks, results, strict=True):
        files = {
            "assignments": out / f"assignments_k{k}.npy",
            "centroids": out / f"centroids_k{k}.npy",
            "sizes_plot": out / f"sizes_k{k}.png",
        }
        np.save(files["assignments"], result.assignments.astype(np.int64))
        np.save(files["centroids"], result.centroids.astype(np.float32))
        plot_cluster_sizes(
            result.assignments, k, files["sizes_plot"], title=f"cluster sizes of {Path(bank_dir).name}"
        )
        if grid_source is not None:
            files["samples_grid"] = out / f"samples_k{k}.png"
            save_cluster_grid(
                grid_source,
                result.assignments,
                files["samples_grid"],
                clusters=grid_clusters,
                images=grid_images,
                seed=seed,
            )
        summary["clusterings"][str(k)] = {
            "statistics": cluster_statistics(result.assignments, k, result.objective, labels),
            "files": {name: str(path) for name, path in files.items()},
        }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def _grid_source(bank: MemoryBank, data: str | Path | None) -> str | None:
    """Where the images of the bank's samples are: ``data`` if given, else the manifest in its metadata."""
    if data is not None:
        return str(data)
    manifest = bank.meta.source.get("manifest_path")
    return str(manifest) if manifest and Path(manifest).exists() else None


def save_cluster_grid(
    shards: str | Path,
    assignments: np.ndarray,
    path: Path,
    *,
    clusters: int = 8,
    images: int = 8,
    seed: int = 0,
) -> Path:
    """A PNG with one row per cluster (the ``clusters`` largest), each showing up to ``images`` of its
    members drawn at random (seeded), read by global index from ``shards``."""
    import torch
    from PIL import Image

    from pipeline.plots import save_image_grid
    from shards.reader import IndexedReader

    sizes = np.bincount(assignments)
    chosen = np.argsort(-sizes, kind="stable")[: max(1, clusters)]
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    for cluster in chosen:
        members = np.flatnonzero(assignments == cluster)
        rows.append(np.sort(rng.choice(members, size=min(images, members.size), replace=False)))
    reader = IndexedReader(shards)
    tiles: list[torch.Tensor] = []
    titles: list[str] = []
    for cluster, members in zip(chosen, rows, strict=True):
        samples = reader.read(members.tolist(), decode=True)
        for slot in range(images):
            if slot < len(samples) and samples[slot].image is not None:
                thumbnail = (
                    samples[slot]
                    .image.convert("RGB")
                    .resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BILINEAR)
                )
                tiles.append(
                    torch.from_numpy(np.asarray(thumbnail, dtype=np.float32) / 255.0).permute(2, 0, 1)
                )
            else:  # a cluster smaller than a row: blank tiles keep one cluster per row
                tiles.append(torch.ones(3, THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            titles.append(f"cluster {cluster} ({sizes[cluster]})" if slot == 0 else "")
    return save_image_grid(torch.stack(tiles), path, rows=len(chosen), titles=titles)
