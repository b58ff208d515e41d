"""Clustering a memory bank on disk: k-means for each k, statistics, and the files a person looks at.

``cluster_bank(BANK_DIR, [k, …], OUT)`` writes, per k: ``k{k}_assignments.npy`` (N,) int64 by global index,
``k{k}_centroids.npy`` (k, D), and two PNGs — the cluster-size histogram and a grid of sample images of a
few clusters, read back from the shards the bank was extracted from — plus ``statistics.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.clustering import cluster_statistics, multi_kmeans
from pipeline.errors import PipelineError
from pipeline.memory_bank import MemoryBank
from pipeline.plots import plot_cluster_sizes, save_image_grid

GRID_CLUSTERS = 8
GRID_IMAGES = 8


@dataclass
class ClusterReport:
    statistics: dict[int, dict[str, float]]
    files: list[Path] = field(default_factory=list)


def cluster_bank(
    bank_dir: str | Path,
    ks: list[int],
    out_dir: str | Path,
    *,
    spherical: bool = False,
    niter: int = 20,
    seed: int = 0,
    l2_normalize: bool = True,
    grid: bool = True,
) -> ClusterReport:
    """k-means of a complete bank for every k in ``ks`` (see the module docstring for the files)."""
    bank = MemoryBank.open(bank_dir)
    if not bank.meta.complete:
        raise PipelineError(f"the memory bank at {bank_dir} is incomplete: finish the extraction first")
    if not ks:
        raise PipelineError("give at least one k")
    features = np.asarray(bank.features, dtype=np.float32)
    if l2_normalize:
        features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    labels = bank.labels if (bank.labels >= 0).any() else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ClusterReport(statistics={})
    for k, result in zip(
        ks, multi_kmeans(features, ks, niter=niter, seed=seed, spherical=spherical), strict=True
    ):
        stats = cluster_statistics(result.assignments, k, objective=result.objective, labels=labels)
        report.statistics[k] = stats
        for name, array in (("assignments", result.assignments), ("centroids", result.centroids)):
            path = out / f"k{k}_{name}.npy"
            np.save(path, array)
            report.files.append(path)
        report.files.append(plot_cluster_sizes(result.assignments, k, out / f"k{k}_sizes.png"))
        data = bank.meta.source.get("data")
        if grid and data:
            report.files.append(_cluster_grid(data, result.assignments, out / f"k{k}_samples.png", seed))
    stats_path = out / "statistics.json"
    stats_path.write_text(json.dumps({str(k): v for k, v in report.statistics.items()}, indent=1))
    report.files.append(stats_path)
    return report


def _cluster_grid(data: str, assignments: np.ndarray, path: Path, seed: int) -> Path:
    """GRID_IMAGES random members of each of the GRID_CLUSTERS largest clusters, one row per cluster."""
    from shards.reader import IndexedReader

    rng = np.random.default_rng(seed)
    sizes = np.bincount(assignments)
    clusters = np.argsort(-sizes)[:GRID_CLUSTERS]
    wanted: list[int] = []
    for cluster in clusters:
        members = np.flatnonzero(assignments == cluster)
        chosen = rng.choice(members, size=min(GRID_IMAGES, members.size), replace=False)
        wanted.extend(chosen.tolist() + [-1] * (GRID_IMAGES - chosen.size))
    reader = IndexedReader(data)
    samples = {s.index: s for s in reader.read([i for i in wanted if i >= 0], decode=True)}
    tiles = []
    for index in wanted:
        if index < 0:
            tiles.append(torch.zeros(3, 32, 32))
            continue
        image = samples[index].image.resize((64, 64))
        tiles.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0)
    size = max(t.shape[-1] for t in tiles)
    tiles = [torch.nn.functional.interpolate(t[None], size=(size, size))[0] for t in tiles]
    titles = [f"cluster {c} ({sizes[c]})" if j == 0 else "" for c in clusters for j in range(GRID_IMAGES)]
    return save_image_grid(torch.stack(tiles), path, rows=len(clusters), titles=titles)
