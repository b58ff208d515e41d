"""Clustering a feature store on disk: k-means for each k, statistics, and the files a person looks at.

``cluster_bank(BANK_DIR, [k, …], OUT)`` writes, per k: ``k{k}_assignments.npy`` (N,) int64 by global index,
``k{k}_centroids.npy`` (k, D') in the space that was clustered, and two PNGs — the cluster-size histogram
``k{k}_sizes.png`` and ``k{k}_samples.png``, a grid of sample images of the largest clusters, read back
from the shards the bank was extracted from — plus ``statistics.json``. ``clusterssl cluster`` and the
pipeline's cluster stage both call it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clusterssl.errors import PipelineError
from clusterssl.models.clustering import as_feature_matrix, cluster_statistics, multi_kmeans, pca_whiten
from clusterssl.pipeline.features.store import FeatureStore
from clusterssl.pipeline.tracking.plots import plot_cluster_sizes, save_image_grid

GRID_CLUSTERS = 8
GRID_IMAGES = 8
THUMBNAIL_SIDE = 64
"""Side of each image in the sample grids (ImageNet-sized images are shrunk, digits enlarged)."""
STATISTICS_FILE = "statistics.json"


@dataclass
class ClusterReport:
    """What ``cluster_bank`` did: per k its statistics and files, and every file written."""

    statistics: dict[int, dict[str, float]]
    files: list[Path] = field(default_factory=list)
    files_by_k: dict[int, dict[str, Path]] = field(default_factory=dict)
    num_samples: int = 0
    dim: int = 0
    """Dimension of the clustered features (after PCA when asked for)."""
    images_from: str | None = None
    """The shards the sample grids were read from (None: no grid)."""


def open_complete_bank(bank_dir: str | Path) -> FeatureStore:
    """The bank in ``bank_dir``, refusing a missing, empty or unfinished one with one clear line."""
    bank = FeatureStore.open(bank_dir)  # refuses a missing or empty bank
    if not bank.meta.complete:
        raise PipelineError(
            f"the feature store at {bank_dir} is unfinished ({bank.num_written} of {bank.meta.num_samples} "
            "rows); run the same `clusterssl extract` command again to complete it"
        )
    return bank


def cluster_bank(
    bank_dir: str | Path,
    ks: Sequence[int],
    out_dir: str | Path,
    *,
    spherical: bool = False,
    niter: int = 20,
    seed: int = 0,
    l2_normalize: bool = True,
    pca_dim: int | None = None,
    grid: bool = True,
    grid_clusters: int = GRID_CLUSTERS,
    grid_images: int = GRID_IMAGES,
    data: str | Path | None = None,
) -> ClusterReport:
    """k-means of a complete bank for every k in ``ks`` (see the module docstring for the files).

    l2_normalize: L2-normalise the features first (always done for ``spherical``, cosine k-means).
    pca_dim:      PCA-whiten to this many dimensions and L2-normalise first (DeepCluster's preprocessing;
                  replaces ``l2_normalize``).
    data:         the shards to read the grid images from; by default those the bank's metadata names.
    Every k is checked against N before any work or file.
    """
    if not ks:
        raise PipelineError("give at least one k")
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
    elif l2_normalize or spherical:
        features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    labels = bank.labels if (bank.labels >= 0).any() else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images_from = _grid_source(bank, data) if grid else None
    report = ClusterReport(
        statistics={}, num_samples=num_samples, dim=int(features.shape[1]), images_from=images_from
    )
    results = multi_kmeans(features, list(ks), niter=niter, seed=seed, spherical=spherical)
    for k, result in zip(ks, results, strict=True):
        report.statistics[k] = cluster_statistics(
            result.assignments, k, objective=result.objective, labels=labels
        )
        files = {"assignments": out / f"k{k}_assignments.npy", "centroids": out / f"k{k}_centroids.npy"}
        np.save(files["assignments"], result.assignments.astype(np.int64))
        np.save(files["centroids"], result.centroids.astype(np.float32))
        files["sizes_plot"] = plot_cluster_sizes(result.assignments, k, out / f"k{k}_sizes.png")
        if images_from is not None:
            files["samples_grid"] = cluster_grid(
                images_from,
                result.assignments,
                out / f"k{k}_samples.png",
                clusters=grid_clusters,
                images=grid_images,
                seed=seed,
            )
        report.files_by_k[k] = files
        report.files.extend(files.values())
    stats_path = out / STATISTICS_FILE
    stats_path.write_text(json.dumps({str(k): v for k, v in report.statistics.items()}, indent=1))
    report.files.append(stats_path)
    return report


def _grid_source(bank: FeatureStore, data: str | Path | None) -> str | None:
    """Where the bank's images are: ``data`` if given, else the shard directory or manifest its metadata
    names (banks from ``clusterssl extract`` and from the trainer record them); None if neither exists."""
    if data is not None:
        return str(data)
    for key in ("data", "manifest_path"):
        location = bank.meta.source.get(key)
        if location and Path(location).exists():
            return str(location)
    return None


def cluster_grid(
    shards: str | Path,
    assignments: np.ndarray,
    path: Path,
    *,
    clusters: int = GRID_CLUSTERS,
    images: int = GRID_IMAGES,
    seed: int = 0,
) -> Path:
    """A PNG with one row per cluster (the ``clusters`` largest), each showing up to ``images`` of its
    members drawn at random (seeded), read by global index from ``shards`` (a directory or manifest)."""
    from PIL import Image

    from clusterssl.shards.reader import IndexedReader

    rng = np.random.default_rng(seed)
    sizes = np.bincount(assignments)
    chosen = np.argsort(-sizes, kind="stable")[: max(1, clusters)]
    rows = []
    for cluster in chosen:
        members = np.flatnonzero(assignments == cluster)
        rows.append(np.sort(rng.choice(members, size=min(images, members.size), replace=False)))
    reader = IndexedReader(shards)
    tiles: list[torch.Tensor] = []
    titles: list[str] = []
    for cluster, members in zip(chosen, rows, strict=True):
        samples = reader.read(members.tolist(), decode=True)
        for slot in range(images):
            image = samples[slot].image if slot < len(samples) else None
            if image is not None:
                thumbnail = image.convert("RGB").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BILINEAR)
                tiles.append(
                    torch.from_numpy(np.asarray(thumbnail, dtype=np.float32) / 255.0).permute(2, 0, 1)
                )
            else:  # a cluster smaller than a row: blank tiles keep one cluster per row
                tiles.append(torch.ones(3, THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            titles.append(f"cluster {cluster} ({sizes[cluster]})" if slot == 0 else "")
    return save_image_grid(torch.stack(tiles), path, rows=len(chosen), titles=titles)
