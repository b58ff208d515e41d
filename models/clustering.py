"""faiss k-means on a memory bank, and the statistics and transforms around it.

The memory bank is an ``(N, D)`` array whose row i belongs to global sample index i (see
``models.types.FeatureBank``); everything here keeps that row order, so ``assignments[i]`` is the cluster
of sample i.

What this module adds to a bare ``faiss.Kmeans`` call, and why:

- **All points are used.** faiss silently trains on a random subsample of ``256 * k`` points; a bank is
  clustered whole unless ``max_points_per_centroid`` asks for a subsample. The final assignment and the
  objective are always computed on every point.
- **A better seeding.** faiss seeds with ``k`` random points. On data made of many compact clusters this
  leaves ~1/e of them without a seed and 20 Lloyd iterations cannot recover (measured: 10% above
  scikit-learn's objective on 1,000 Gaussian clusters, tools/bench_kmeans.py). The default
  ``init="kmeans||"`` seeds with k-means‖ (Bahmani et al. 2012, models/seeding.py): a few passes that
  each draw many candidates, then k-means++ on the weighted candidates; its cost grows with k like a
  Lloyd iteration's, not like k sequential passes. ``init="kmeans++"`` seeds with greedy k-means++ (Arthur & Vassilvitskii 2007; each seed the best of
  ``init_trials`` candidates drawn in proportion to the squared distance to the seeds so far) on a seeded
  subsample of ``init_points_per_centroid * k`` points, then runs faiss's Lloyd iterations on all points.
  ``init="random"`` is faiss's own seeding, as in the DeepCluster and PCL originals.
- **No empty cluster** when ``N >= k`` (see ``repair_empty_clusters``), so every pseudo-label exists.
- **Errors a user can cause** (k larger than the bank, empty bank, NaN features) are one ``ModelError`` line.
- **This process's GPU when there is one.** ``gpu=None`` clusters on the process's own GPU (torch's
  current device, the rank's under DDP) when faiss sees one (faiss-gpu), else on the CPU; never on every
  GPU of the node, which the other ranks are using.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from clusterssl.errors import ModelError

log = logging.getLogger(__name__)

ROWS_PER_CHUNK = 65536
"""Rows processed at once when streaming over a bank (validation, distances, PCA apply): bounds the
temporary memory to ``ROWS_PER_CHUNK * D`` floats whatever N is."""

KMEANS_INITS = ("kmeans||", "kmeans++", "random")

MAX_REPAIR_ROUNDS = 10

SEEDING_WORK_BUDGET = 4
"""Cap on the k-means++ seeding work, in Lloyd iterations: the seeding sample is shrunk so that
``sample_size * init_trials <= SEEDING_WORK_BUDGET * N`` (each Lloyd iteration costs N distance
evaluations per centroid, the seeding ``sample_size * init_trials``). Without it, large k (PCL's 100,000)
would make the sequential seeding cost more than the clustering itself."""

PCA_RELATIVE_VARIANCE_FLOOR = 1e-6
"""Principal directions whose variance is below this fraction of the largest are dropped before
whitening: they are rounding noise of a rank-deficient bank, and scaling them by ``variance ** -0.5``
would blow that noise up to the same weight as real directions."""


class KMeansResult(NamedTuple):
    """centroids: (k, D) float32; assignments: (N,) int64 in [0, k); objective: sum over all N points of
    the squared Euclidean distance to the assigned centroid (float64 accumulation)."""

    centroids: np.ndarray
    assignments: np.ndarray
    objective: float


# --------------------------------------------------------------------------------------------- input


def as_feature_matrix(features: Any, *, name: str = "features") -> np.ndarray:
    """Validate a bank and return it as one C-contiguous float32 ``(N, D)`` array.

    Accepts numpy arrays of any float dtype (float16/float64 are converted once), read-only memmaps
    (a float32 C-contiguous memmap is used in place) and torch tensors (copied to the CPU). Raises
    ``ModelError`` for a wrong number of dimensions, an empty bank, or non-finite values (checked after
    the float32 conversion, so float64 values too large for float32 are caught too).
    """
    if hasattr(features, "detach") and hasattr(features, "cpu"):  # a torch tensor, without importing torch
        features = features.detach().cpu().float().numpy()
    array = np.asarray(features)
    if array.ndim != 2:
        raise ModelError(f"{name} must be a 2-D (samples, dim) array, got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ModelError(f"{name} is empty (shape {tuple(array.shape)}): nothing to cluster")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ModelError(f"{name} must hold numbers, got dtype {array.dtype}")
    with np.errstate(over="ignore"):  # too large for float32 becomes inf, reported just below
        matrix = np.ascontiguousarray(array, dtype=np.float32)
    _check_finite(matrix, name)
    return matrix


def _check_finite(matrix: np.ndarray, name: str) -> None:
    """One pass over the bank in chunks (a full-size boolean mask would cost N*D bytes)."""
    bad_rows = 0
    first_bad: int | None = None
    for start in range(0, matrix.shape[0], ROWS_PER_CHUNK):
        finite_rows = np.isfinite(matrix[start : start + ROWS_PER_CHUNK]).all(axis=1)
        if not finite_rows.all():
            bad = np.flatnonzero(~finite_rows)
            bad_rows += bad.size
            if first_bad is None:
                first_bad = start + int(bad[0])
    if bad_rows:
        raise ModelError(
            f"{name} has {bad_rows} row(s) with NaN or infinite values (first: row {first_bad}); "
            "a diverged checkpoint or a corrupt bank?"
        )


def _check_k(k: int, num_samples: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ModelError(f"k must be an integer, got {k!r}")
    if k < 1:
        raise ModelError(f"k={k}: the number of clusters must be at least 1")
    if k > num_samples:
        raise ModelError(f"k={k} is larger than the number of samples ({num_samples})")
    return int(k)


def _resolve_gpus(gpu: bool | int | None) -> int:
    """Number of GPUs faiss should use: None = this process's GPU when faiss sees one (0 on faiss-cpu),
    True = all (at least one required), False = none, an int = that many (1: this process's)."""
    import faiss

    available = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpu is None:
        if available == 0:
            _warn_if_cuda_without_faiss_gpu()
        return min(available, 1)
    if gpu is False or gpu == 0:
        return 0
    wanted = available if gpu is True else int(gpu)
    if available == 0 or wanted > available:
        raise ModelError(
            f"gpu={gpu!r} but faiss sees {available} GPU(s); install faiss-gpu or pass gpu=None/False"
        )
    return wanted


def process_gpu() -> int:
    """The GPU this process clusters on: torch's current CUDA device, which is the rank's own once the
    process group has set it (so the ranks of a node do not all pile onto GPU 0, or onto every GPU)."""
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def on_gpus(index: Any, num_gpus: int) -> Any:
    """A CPU faiss ``index`` placed where the clustering runs: left on the CPU (0), on this process's GPU
    alone (1, ``process_gpu``), or sharded over faiss's first ``num_gpus`` GPUs (an explicit request)."""
    if num_gpus == 0:
        return index
    import faiss

    if num_gpus == 1:
        return faiss.index_cpu_to_gpu(_gpu_resources(), process_gpu(), index)
    return faiss.index_cpu_to_all_gpus(index, ngpu=num_gpus)


@functools.cache
def _gpu_resources() -> Any:
    """faiss's GPU resources, made once per process: each instance reserves scratch memory on the GPUs it
    serves, so one per index would pile up over the epochs."""
    import faiss

    return faiss.StandardGpuResources()


def _warn_if_cuda_without_faiss_gpu() -> None:
    """A CPU-only faiss on a GPU machine clusters on the CPU without a word: say so, with the fix."""
    import torch

    if torch.cuda.is_available():
        log.warning(
            "CUDA works but faiss sees no GPU, so k-means runs on the CPU: faiss-cpu is installed, or faiss-gpu "
            "cannot load its CUDA 12 libraries (fix: pip uninstall -y faiss-cpu faiss-gpu; pip install faiss-gpu)"
        )


# ------------------------------------------------------------------------------------------- k-means


def kmeans(
    features: Any,
    k: int,
    *,
    niter: int = 20,
    seed: int = 0,
    spherical: bool = False,
    gpu: bool | int | None = None,
    nredo: int = 1,
    max_points_per_centroid: int | None = None,
    verbose: bool = False,
    init: str = "kmeans||",
    init_points_per_centroid: int = 10,
    init_trials: int = 32,
) -> KMeansResult:
    """Cluster the rows of ``features`` (N, D) into k clusters with faiss.

    niter:     Lloyd iterations (faiss stops earlier once an iteration leaves the objective unchanged).
    seed:      seeds the subsample, the seeding and faiss; the same seed gives the same result. Redo r
               uses ``seed + r``.
    spherical: centroids are L2-normalised after every update (cosine k-means); feed L2-normalised
               features for the usual spherical k-means.
    gpu:       None = this process's GPU (``process_gpu``) when faiss sees one, else the CPU; True = every
               GPU faiss sees, an int = that many (1: this process's), an error if absent.
    nredo:     run the whole clustering this many times (seeds ``seed .. seed+nredo-1``) and keep the
               lowest objective on all points.
    max_points_per_centroid: train on a random subsample of at most this many points per centroid
               (faiss's knob). None = every point. The final assignment always covers every point.
    init:      ``"kmeans||"`` (k-means‖ on a subsample, the default: models/seeding.py, a few wide passes
               instead of k sequential ones, on the GPU when faiss uses one), ``"kmeans++"`` (greedy
               k-means++ on a subsample, one seed per pass) or ``"random"`` (faiss).
    init_points_per_centroid, init_trials: the k-means++ seeding runs on a subsample of
               ``init_points_per_centroid * k`` points (capped, see ``SEEDING_WORK_BUDGET``) and picks
               each seed as the best of ``init_trials`` candidates. Its cost is linear in both; more
               candidates buy more than more points on noisy high-dimensional data (tools/bench_kmeans.py).

    Returns centroids (k, D) float32, assignments (N,) int64 and the objective (sum of squared
    distances on all points). With ``N >= k`` no cluster is empty.
    """
    matrix = as_feature_matrix(features)
    k = _check_k(k, matrix.shape[0])
    num_gpus = _resolve_gpus(gpu)
    if init not in KMEANS_INITS:
        raise ModelError(f"unknown k-means init {init!r}; known: {', '.join(KMEANS_INITS)}")
    if niter < 1 or nredo < 1:
        raise ModelError(f"niter and nredo must be at least 1, got niter={niter}, nredo={nredo}")
    if max_points_per_centroid is not None and max_points_per_centroid < 1:
        raise ModelError(f"max_points_per_centroid must be at least 1, got {max_points_per_centroid}")
    if init_points_per_centroid < 1 or init_trials < 1:
        raise ModelError(
            f"init_points_per_centroid and init_trials must be at least 1, got "
            f"{init_points_per_centroid} and {init_trials}"
        )
    if not 0 <= seed < 2**31 - nredo:
        raise ModelError(f"seed must be in [0, 2**31 - nredo), got {seed}")

    best: KMeansResult | None = None
    for redo in range(nredo):
        result = _kmeans_once(
            matrix,
            k,
            niter=niter,
            seed=seed + redo,
            spherical=spherical,
            num_gpus=num_gpus,
            max_points_per_centroid=max_points_per_centroid,
            verbose=verbose,
            init=init,
            init_points_per_centroid=init_points_per_centroid,
            init_trials=init_trials,
        )
        if best is None or result.objective < best.objective:
            best = result
    assert best is not None
    return best


def multi_kmeans(features: Any, ks: Sequence[int], **kwargs: Any) -> list[KMeansResult]:
    """k-means for each k in ``ks`` on the same bank (PCL's hierarchy of clusterings). The bank is
    converted once (``kmeans`` then takes the float32 matrix in place) and every k is checked before any
    clustering starts. ``kwargs`` are those of ``kmeans``."""
    matrix = as_feature_matrix(features)
    if len(ks) == 0:
        raise ModelError("multi_kmeans needs at least one k")
    checked = [_check_k(k, matrix.shape[0]) for k in ks]
    return [kmeans(matrix, k, **kwargs) for k in checked]


def _kmeans_once(
    matrix: np.ndarray,
    k: int,
    *,
    niter: int,
    seed: int,
    spherical: bool,
    num_gpus: int,
    max_points_per_centroid: int | None,
    verbose: bool,
    init: str,
    init_points_per_centroid: int,
    init_trials: int,
) -> KMeansResult:
    import faiss

    num_samples, dim = matrix.shape
    rng = np.random.default_rng(seed)
    training = matrix
    if max_points_per_centroid is not None and num_samples > max_points_per_centroid * k:
        # Draw the subsample ourselves so that the k-means++ seeds come from the same points.
        rows = np.sort(rng.choice(num_samples, size=max_points_per_centroid * k, replace=False))
        training = matrix[rows]

    initial: np.ndarray | None = None
    if init == "kmeans++":
        budget = max(k, SEEDING_WORK_BUDGET * training.shape[0] // init_trials)
        sample_size = min(training.shape[0], init_points_per_centroid * k, budget)
        rows = np.arange(training.shape[0])
        if sample_size < training.shape[0]:
            rows = np.sort(rng.choice(training.shape[0], size=sample_size, replace=False))
        sample = np.ascontiguousarray(training[rows])
        initial = sample[kmeanspp_seeds(sample, k, rng, n_trials=init_trials)]
        if spherical:
            initial = _unit_rows(initial)
    elif init == "kmeans||":
        initial = _parallel_seeding(training, k, rng, init_points_per_centroid, num_gpus, spherical)

    clustering = faiss.Kmeans(
        dim,
        k,
        niter=niter,
        seed=seed,
        spherical=spherical,
        verbose=verbose,
        # Train on every point handed over (faiss would subsample to 256*k), and silence faiss's
        # "please provide at least 39*k points" warning: we checked k <= N ourselves.
        max_points_per_centroid=training.shape[0] // k + 1,
        min_points_per_centroid=1,
    )
    clustering.index = on_gpus(clustering.index, num_gpus)  # not faiss's gpu=: that takes every GPU
    clustering.train(training, init_centroids=initial)
    centroids = np.ascontiguousarray(clustering.centroids, dtype=np.float32)
    if spherical:
        centroids = _unit_rows(centroids)

    _, assignments = nearest_centroids(matrix, centroids, num_gpus=num_gpus)
    centroids, assignments = repair_empty_clusters(
        matrix, centroids, assignments, spherical=spherical, num_gpus=num_gpus
    )
    objective = float(squared_distances_to_centroids(matrix, centroids, assignments).sum(dtype=np.float64))
    return KMeansResult(centroids, assignments, objective)


def _parallel_seeding(
    training: np.ndarray,
    k: int,
    rng: np.random.Generator,
    points_per_centroid: int,
    num_gpus: int,
    spherical: bool,
) -> np.ndarray:
    """k-means‖ seeds (k, D) from a seeded subsample of ``points_per_centroid * k`` training points; its
    passes are wide matrix products, so it runs on this process's GPU when faiss clusters on one."""
    import torch

    from clusterssl.models.seeding import kmeans_parallel_seeds

    rows = np.arange(training.shape[0])
    if points_per_centroid * k < training.shape[0]:
        rows = np.sort(rng.choice(training.shape[0], size=points_per_centroid * k, replace=False))
    sample = np.ascontiguousarray(training[rows])
    on_gpu = num_gpus > 0 and torch.cuda.is_available()
    points = torch.from_numpy(sample).to(torch.device("cuda", process_gpu()) if on_gpu else "cpu")
    initial = sample[kmeans_parallel_seeds(points, k, rng)]
    return _unit_rows(initial) if spherical else initial


def kmeanspp_seeds(
    points: np.ndarray, k: int, rng: np.random.Generator, n_trials: int | None = None
) -> np.ndarray:
    """Greedy k-means++ seeding: indices (k,) of ``points`` (M, D) float32 to start Lloyd from.

    The first seed is uniform; each next one is the best of ``n_trials`` (default ``2 + ln k``)
    candidates drawn with probability proportional to the squared distance to the nearest seed so far,
    "best" meaning the lowest resulting sum of squared distances. Seeds are distinct while the points
    have distinct values left (when every point coincides with a seed, the next seed is a uniform draw
    among the unused points).
    """
    num_points = points.shape[0]
    trials = n_trials if n_trials is not None else 2 + int(math.log(k))
    squared_norms = np.einsum("ij,ij->i", points, points)
    chosen = np.empty(k, dtype=np.int64)
    used = np.zeros(num_points, dtype=bool)
    chosen[0] = rng.integers(num_points)
    used[chosen[0]] = True
    # nearest[i] = squared distance of point i to its nearest seed; the expansion |x|^2 + |c|^2 - 2 x.c
    # keeps the cost one matrix product per step, clamped at 0 against rounding.
    nearest = squared_norms + squared_norms[chosen[0]] - 2.0 * (points @ points[chosen[0]])
    np.maximum(nearest, 0.0, out=nearest)
    nearest[used] = 0.0
    candidate_distances = np.empty((trials, num_points), dtype=np.float32)
    points_t = np.ascontiguousarray(points.T)  # (D, M): makes the per-step product a wide, fast GEMM
    cumulative = np.empty(num_points, dtype=np.float64)
    for step in range(1, k):
        np.cumsum(nearest, out=cumulative)
        total = cumulative[-1]
        if total <= 0.0:
            # Every point sits on a seed (duplicates): no distance to weight by.
            chosen[step] = rng.choice(np.flatnonzero(~used))
            used[chosen[step]] = True
            continue
        candidates = np.minimum(np.searchsorted(cumulative, rng.random(trials) * total), num_points - 1)
        np.dot(points[candidates], points_t, out=candidate_distances)
        candidate_distances *= -2.0
        candidate_distances += squared_norms
        candidate_distances += squared_norms[candidates][:, None]
        np.maximum(candidate_distances, 0.0, out=candidate_distances)
        np.minimum(candidate_distances, nearest, out=candidate_distances)
        best = int(np.argmin(candidate_distances.sum(axis=1, dtype=np.float64)))
        chosen[step] = candidates[best]
        used[chosen[step]] = True
        nearest[:] = candidate_distances[best]
        nearest[chosen[step]] = 0.0
    return chosen


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.maximum(norms, np.finfo(np.float32).tiny), dtype=np.float32)


def nearest_centroids(
    features: np.ndarray, centroids: np.ndarray, *, num_gpus: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive nearest-centroid search (faiss flat L2 index). Returns squared distances (N,) float32
    as faiss computes them and assignments (N,) int64. With unit-norm centroids the L2 nearest is also
    the largest inner product, so this serves spherical k-means too."""
    import faiss

    index = on_gpus(faiss.IndexFlatL2(centroids.shape[1]), num_gpus)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, ids = index.search(features, 1)
    return distances[:, 0], ids[:, 0].astype(np.int64)


def repair_empty_clusters(
    features: np.ndarray,
    centroids: np.ndarray,
    assignments: np.ndarray,
    *,
    spherical: bool = False,
    num_gpus: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Give every empty cluster a member, when there are at least as many points as clusters.

    The rule, one round:
      1. Each empty cluster, in increasing id order, takes the point farthest from its own centroid among
         the clusters that still have at least two members: the centroid moves onto that point (onto its
         direction, unit norm, when ``spherical``) and the point joins it. No other cluster can empty.
      2. Every point is reassigned to its nearest centroid. If no cluster is empty, that is the result.
    Otherwise (the moved centroids took all the points of another cluster) another round starts from the
    reassigned state. After ``MAX_REPAIR_ROUNDS`` rounds (only reached with many duplicate points, where
    nearest-centroid ties cannot give every cluster a member) the forced assignment of step 1 is kept:
    every cluster has a member, though a few points may not sit at their nearest centroid.

    features (N, D) float32, centroids (k, D), assignments (N,) int64. Returns new centroids and
    assignments (inputs are not modified).
    """
    k = centroids.shape[0]
    centroids = np.array(centroids, dtype=np.float32, copy=True)
    assignments = np.array(assignments, dtype=np.int64, copy=True)
    if features.shape[0] < k or np.bincount(assignments, minlength=k).min() > 0:
        return centroids, assignments
    for _ in range(MAX_REPAIR_ROUNDS):
        centroids, forced = _reseed_empty_clusters(features, centroids, assignments, spherical)
        _, assignments = nearest_centroids(features, centroids, num_gpus=num_gpus)
        if np.bincount(assignments, minlength=k).min() > 0:
            return centroids, assignments
    return centroids, forced


def _reseed_empty_clusters(
    features: np.ndarray, centroids: np.ndarray, assignments: np.ndarray, spherical: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 of ``repair_empty_clusters``: returns (centroids, forced assignments) with no empty cluster."""
    k = centroids.shape[0]
    sizes = np.bincount(assignments, minlength=k)
    distances = squared_distances_to_centroids(features, centroids, assignments)
    if spherical:
        # A zero vector has no direction to seed a unit centroid with.
        distances[np.linalg.norm(features, axis=1) == 0] = -np.inf
    centroids = centroids.copy()
    assignments = assignments.copy()
    donors = iter(np.argsort(-distances, kind="stable"))
    for empty in np.flatnonzero(sizes == 0):
        point = next(i for i in donors if sizes[assignments[i]] >= 2)
        sizes[assignments[point]] -= 1
        sizes[empty] = 1
        assignments[point] = empty
        centroids[empty] = features[point]
        if spherical:
            centroids[empty] = _unit_rows(features[point : point + 1])[0]
    return centroids, assignments


# ------------------------------------------------------------------------------------------ distances


def squared_distances_to_centroids(features: Any, centroids: Any, assignments: Any) -> np.ndarray:
    """(N,) float64: ``|x_i - c_{a_i}|^2`` computed from the differences (not the |x|^2+|c|^2-2x.c
    expansion), so the objective has no cancellation error."""
    matrix = np.asarray(features, dtype=np.float32)
    centroid_matrix = np.asarray(centroids, dtype=np.float32)
    ids = np.asarray(assignments, dtype=np.int64)
    if matrix.ndim != 2 or centroid_matrix.ndim != 2 or matrix.shape[1] != centroid_matrix.shape[1]:
        raise ModelError(
            f"features {tuple(matrix.shape)} and centroids {tuple(centroid_matrix.shape)} do not match"
        )
    if ids.shape != (matrix.shape[0],):
        raise ModelError(f"assignments {tuple(ids.shape)} do not match {matrix.shape[0]} samples")
    if ids.size and (ids.min() < 0 or ids.max() >= centroid_matrix.shape[0]):
        raise ModelError(
            f"assignments must be in [0, {centroid_matrix.shape[0]}), got {ids.min()}..{ids.max()}"
        )
    result = np.empty(matrix.shape[0], dtype=np.float64)
    for start in range(0, matrix.shape[0], ROWS_PER_CHUNK):
        stop = start + ROWS_PER_CHUNK
        difference = matrix[start:stop] - centroid_matrix[ids[start:stop]]
        result[start:stop] = np.einsum("ij,ij->i", difference, difference, dtype=np.float64)
    return result


def distances_to_centroids(features: Any, centroids: Any, assignments: Any) -> np.ndarray:
    """(N,) float64 Euclidean distance of each sample to its assigned centroid (PCL's concentration)."""
    return np.sqrt(squared_distances_to_centroids(features, centroids, assignments))


# ----------------------------------------------------------------------------------------- statistics


def cluster_statistics(
    assignments: Any, k: int, objective: float | None = None, labels: Any = None
) -> dict[str, float]:
    """Summary of one clustering, for logging.

    assignments: (N,) cluster ids in [0, k); entries < 0 (samples never assigned) are left out.
    labels:      optional (N,) class ids; entries < 0 (unknown) are left out of NMI/ARI.
    Returns ``k``, ``size_min``, ``size_median``, ``size_max`` (over all k clusters, empty ones included),
    ``empty_clusters``, plus ``objective`` when given and ``nmi``/``ari`` (scikit-learn, arithmetic NMI)
    when labels are given and at least one sample has both a cluster and a label.
    """
    ids = np.asarray(assignments, dtype=np.int64).ravel()
    if ids.size and ids.max() >= k:
        raise ModelError(f"assignments go up to {ids.max()} but k={k}")
    assigned = ids >= 0
    sizes = np.bincount(ids[assigned], minlength=k)
    stats: dict[str, float] = {
        "k": float(k),
        "size_min": float(sizes.min()),
        "size_median": float(np.median(sizes)),
        "size_max": float(sizes.max()),
        "empty_clusters": float((sizes == 0).sum()),
    }
    if objective is not None:
        stats["objective"] = float(objective)
    if labels is not None:
        label_array = np.asarray(labels, dtype=np.int64).ravel()
        if label_array.shape != ids.shape:
            raise ModelError(f"labels {label_array.shape} do not match assignments {ids.shape}")
        keep = assigned & (label_array >= 0)
        if keep.any():
            from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

            stats["nmi"] = float(normalized_mutual_info_score(label_array[keep], ids[keep]))
            stats["ari"] = float(adjusted_rand_score(label_array[keep], ids[keep]))
    return stats


def clustering_nmi(previous_assignments: Any, assignments: Any) -> float:
    """NMI between two clusterings of the same samples (DeepCluster's stability curve, Fig. 2b). Samples
    unassigned (< 0) in either are left out."""
    previous = np.asarray(previous_assignments, dtype=np.int64).ravel()
    current = np.asarray(assignments, dtype=np.int64).ravel()
    if previous.shape != current.shape:
        raise ModelError(f"clusterings of different sizes: {previous.size} and {current.size} samples")
    keep = (previous >= 0) & (current >= 0)
    if not keep.any():
        raise ModelError("no sample is assigned in both clusterings")
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(previous[keep], current[keep]))


def epoch_clustering_metrics(
    assignments: Any,
    k: int,
    *,
    objective: float | None = None,
    labels: Any = None,
    previous: Any = None,
    prefix: str = "clustering/",
) -> dict[str, float]:
    """What a method logs after each epoch's clustering: ``cluster_statistics`` (sizes, empty clusters,
    objective, NMI/ARI against the labels when given) plus ``stability_nmi``, the NMI with the previous
    epoch's clustering when given (same samples), every key prefixed with ``prefix``."""
    stats = cluster_statistics(assignments, k, objective, labels)
    if previous is not None:
        stats["stability_nmi"] = clustering_nmi(previous, assignments)
    return {f"{prefix}{key}": value for key, value in stats.items()}


# ---------------------------------------------------------------------------------------- PCA whitening


@dataclass(frozen=True)
class PCAWhitening:
    """A fitted PCA-whitening: ``y = matrix @ x + bias``, then optionally L2 normalisation.

    matrix:    (dim, D) float32, rows = principal directions scaled by ``variance ** eigen_power``.
    bias:      (dim,) float32, ``-matrix @ mean``.
    variances: (dim,) float64, variance of the bank along each kept direction (divided by N).
    """

    matrix: np.ndarray
    bias: np.ndarray
    variances: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[0])

    def apply(self, features: Any, *, normalize: bool = True) -> np.ndarray:
        """(N, D) → (N, dim) float32; L2-normalised rows when ``normalize`` (DeepCluster's input to
        k-means). Streams over the rows, so a memmapped bank is not loaded twice."""
        matrix = np.asarray(features)
        if matrix.ndim != 2 or matrix.shape[1] != self.matrix.shape[1]:
            raise ModelError(f"PCA expects (N, {self.matrix.shape[1]}) features, got {tuple(matrix.shape)}")
        out = np.empty((matrix.shape[0], self.dim), dtype=np.float32)
        for start in range(0, matrix.shape[0], ROWS_PER_CHUNK):
            chunk = np.asarray(matrix[start : start + ROWS_PER_CHUNK], dtype=np.float32)
            out[start : start + ROWS_PER_CHUNK] = chunk @ self.matrix.T + self.bias
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norms, np.finfo(np.float32).tiny)
        return out


def pca_whiten(features: Any, dim: int = 256, eigen_power: float = -0.5) -> tuple[np.ndarray, PCAWhitening]:
    """DeepCluster v1's preprocessing: PCA to ``dim`` dims, whitening, L2 normalisation (faiss PCAMatrix).

    features (N, D) → (N, d) float32 with unit-norm rows, and the fitted ``PCAWhitening`` (to transform
    other features the same way). Before normalisation the output has identity covariance (variance 1
    along every kept direction) when ``eigen_power = -0.5``.

    The number of kept dimensions d follows one rule, with no warning: ``d = min(dim, D, N - 1)`` (N
    centred points span at most N - 1 directions), then directions with a variance below
    ``PCA_RELATIVE_VARIANCE_FLOOR`` times the largest are dropped (rank-deficient banks: duplicates,
    constant features). ``state.dim`` tells which d was used. Every point is used to fit the PCA.
    """
    import faiss

    matrix = as_feature_matrix(features)
    num_samples, input_dim = matrix.shape
    if dim < 1:
        raise ModelError(f"PCA dim must be at least 1, got {dim}")
    if num_samples < 2:
        raise ModelError(f"PCA whitening needs at least 2 samples, got {num_samples}")
    out_dim = min(dim, input_dim, num_samples - 1)
    pca = faiss.PCAMatrix(input_dim, out_dim, float(eigen_power))
    pca.max_points_per_d = num_samples // input_dim + 1  # fit on every point (faiss caps at 1000 * D)
    pca.train(matrix)
    # faiss's eigenvalues are sums over the N points, not variances: its whitened output has variance
    # 1/N. Rescale to unit variance so that the state means what its docstring says.
    variances = faiss.vector_to_array(pca.eigenvalues)[:out_dim].astype(np.float64) / num_samples
    largest = variances.max(initial=0.0)
    # A float32 covariance carries rounding of about 1e-7 of the squared magnitudes: a constant bank
    # (every row the same) shows "variances" of that size, which must not be whitened into directions.
    mean = faiss.vector_to_array(pca.mean).astype(np.float64)
    if largest <= 1e-5 * float(np.max(mean**2, initial=0.0)) or largest <= 0.0:
        raise ModelError("features have no variance (every row is the same): nothing to whiten")
    keep = variances > PCA_RELATIVE_VARIANCE_FLOOR * largest
    scale = np.float32(math.sqrt(num_samples) ** (-2.0 * eigen_power))
    projection = faiss.vector_to_array(pca.A).reshape(out_dim, input_dim)[keep] * scale
    bias = faiss.vector_to_array(pca.b)[:out_dim][keep] * scale
    state = PCAWhitening(
        matrix=np.ascontiguousarray(projection, dtype=np.float32),
        bias=np.ascontiguousarray(bias, dtype=np.float32),
        variances=variances[keep],
    )
    return state.apply(matrix), state
