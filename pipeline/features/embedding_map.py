"""A 2-D map of features coloured by label: scikit-learn's t-SNE of a capped, seeded, stratified sample.

t-SNE costs O(n log n) per iteration with a large constant, so the map embeds at most ``max_points``
samples (2,000 by default: about half a minute on two cores), drawn evenly from every class so that a
small class is not lost in the sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clusterssl.errors import PipelineError

MAX_POINTS = 2000


@dataclass(frozen=True)
class EmbeddingMap:
    path: Path
    points: np.ndarray
    """(n, 2) map coordinates, row j for sample ``rows[j]``."""
    rows: np.ndarray
    """(n,) the rows of the input features that were mapped."""


def sample_rows(labels: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    """Sorted rows of a seeded sample of at most ``max_points``, the same share of every label."""
    count = len(labels)
    if count <= max_points:
        return np.arange(count)
    rng = np.random.default_rng(seed)
    fraction = max_points / count
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = max(1, round(len(members) * fraction))
        chosen.append(rng.choice(members, min(take, len(members)), replace=False))
    rows = np.concatenate(chosen)
    if len(rows) > max_points:  # rounding up of many small classes
        rows = rng.choice(rows, max_points, replace=False)
    return np.sort(rows)


def embedding_map(
    features: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    *,
    class_names: Sequence[str] = (),
    max_points: int = MAX_POINTS,
    seed: int = 0,
    title: str = "",
) -> EmbeddingMap:
    """t-SNE of ``features`` (N, D) to 2-D, drawn as a PNG at ``path`` with one colour per label (N,)
    (-1: unlabelled, grey)."""
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise PipelineError(
            f"a map needs features (N, D) and labels (N,), got {features.shape}, {labels.shape}"
        )
    if len(features) < 4:
        raise PipelineError(f"a map needs at least 4 samples, got {len(features)}")
    rows = sample_rows(labels, max_points, seed)
    picked = features[rows]
    # cosine geometry, as the k-NN and the clustering see the features
    picked = picked / np.maximum(np.linalg.norm(picked, axis=1, keepdims=True), 1e-12)
    perplexity = float(min(30.0, (len(rows) - 1) / 3))
    # 500 iterations: the layout has settled by then on maps of this size, at half the default cost
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=seed)
    points = tsne.fit_transform(picked)
    _draw(points, labels[rows], Path(path), class_names, title or f"t-SNE of {len(rows)} samples")
    return EmbeddingMap(Path(path), points, rows)


def _draw(points: np.ndarray, labels: np.ndarray, path: Path, class_names: Sequence[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 6), dpi=110)
    palette = plt.get_cmap("tab10" if len(np.unique(labels)) <= 10 else "tab20")
    for position, label in enumerate(np.unique(labels)):
        here = labels == label
        name = "unlabelled" if label < 0 else (class_names[label] if label < len(class_names) else str(label))
        colour = "lightgrey" if label < 0 else palette(position % palette.N)
        axes.scatter(points[here, 0], points[here, 1], s=4, color=colour, label=name, linewidths=0)
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    if len(np.unique(labels)) <= 20:
        axes.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
