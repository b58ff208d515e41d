"""k-means‖ seeding (Bahmani et al., "Scalable K-Means++", VLDB 2012), in torch so that it runs on the GPU
when the points are there.

Greedy k-means++ picks one seed per step and every step reads all points: k sequential passes, each a thin
matrix product, which for PCL's k = 100,000 on a 160k-point sample means hours. k-means‖ instead draws
many candidates per pass, independently, each with probability proportional to its squared distance to
the candidates so far, for a handful of passes (``rounds``); the passes are wide matrix products, together
about as much work as ``oversampling`` Lloyd iterations. The candidates (about ``oversampling * k``) are
weighted by how many points they are nearest to, and k-means++ on those weighted candidates picks the k
seeds: greedy, one seed per step, up to ``MAX_SEQUENTIAL_STEPS`` seeds, in blocks beyond, so that the
sequential part is a bounded number of passes over ~2k candidates instead of k passes over every point.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

DISTANCE_BLOCK = 1 << 24
"""Entries of a points × centres distance block computed at once (64 MiB of float32): bounds the
temporary memory whatever the number of points or candidates."""

MAX_SEQUENTIAL_STEPS = 1024
"""Seeds beyond this many are drawn in blocks (see ``weighted_kmeanspp``): the sequential steps, each a
pass over the candidates, stay bounded whatever k is."""


def kmeans_parallel_seeds(
    points: np.ndarray | Tensor,
    k: int,
    rng: np.random.Generator,
    *,
    rounds: int = 5,
    oversampling: float = 2.0,
    n_trials: int | None = None,
) -> np.ndarray:
    """Indices (k,) of rows of ``points`` (M, D) to start Lloyd from; deterministic for a given ``rng``
    state, on the device ``points`` live on (a numpy array is used on the CPU without a copy).

    rounds:       sampling passes over the points (5 in the paper; more rarely help).
    oversampling: expected candidates per pass, as a multiple of ``k / rounds`` (about
                  ``oversampling * k`` candidates in all).
    n_trials:     greedy candidates per seed in the final weighted k-means++ (default ``2 + ln k``).
    """
    x = torch.as_tensor(points, dtype=torch.float32)
    num_points = x.shape[0]
    if k >= num_points:
        return np.arange(num_points, dtype=np.int64)[:k]
    generator = torch.Generator(device=x.device).manual_seed(int(rng.integers(2**62)))
    squared_norms = (x * x).sum(dim=1)
    first = int(rng.integers(num_points))
    candidates = [torch.tensor([first], device=x.device)]
    nearest = _squared_distances(x, squared_norms, x[first : first + 1]).squeeze(1)
    owner = torch.zeros(num_points, dtype=torch.long, device=x.device)
    count = 1
    per_round = oversampling * k / rounds
    for _ in range(rounds):
        total = float(nearest.sum())
        if total <= 0.0:  # every point sits on a candidate
            break
        probability = (nearest * (per_round / total)).clamp_(max=1.0)
        picked = torch.nonzero(torch.rand(num_points, generator=generator, device=x.device) < probability)
        picked = picked.flatten()
        if picked.numel() == 0:
            continue
        distances, closest = _nearest_of(x, squared_norms, picked)
        closer = distances < nearest
        nearest = torch.where(closer, distances, nearest)
        owner = torch.where(closer, closest + count, owner)
        candidates.append(picked)
        count += picked.numel()
    chosen = torch.cat(candidates)
    if count <= k:
        return _top_up(chosen, num_points, k, rng)
    weights = torch.bincount(owner, minlength=count).to(torch.float32)
    picks = weighted_kmeanspp(x[chosen], weights, k, generator, n_trials=n_trials)
    return chosen[picks].cpu().numpy().astype(np.int64)


def weighted_kmeanspp(
    points: Tensor,
    weights: Tensor,
    k: int,
    generator: torch.Generator,
    n_trials: int | None = None,
    max_steps: int = MAX_SEQUENTIAL_STEPS,
) -> Tensor:
    """k-means++ on weighted points (C, D): indices (k,) of distinct points, drawn in proportion to
    weight × squared distance to the seeds so far.

    Up to ``max_steps`` seeds it is greedy k-means++, one seed per step, each the best of ``n_trials``
    draws (lowest weighted sum of squared distances). Beyond, seeds are drawn in blocks of
    ``ceil(k / max_steps)`` per step (without the trials): the same total work as one weighted Lloyd
    iteration, in ``max_steps`` wide matrix products instead of k thin ones. Points of zero weight come
    last, once every weighted point is covered.
    """
    num_points = points.shape[0]
    trials = n_trials if n_trials is not None else 2 + int(math.log(k))
    block = math.ceil(k / max_steps)
    squared_norms = (points * points).sum(dim=1)
    chosen = torch.empty(k, dtype=torch.long, device=points.device)
    chosen[0] = torch.multinomial(weights + 1e-12, 1, generator=generator)[0]
    nearest = _squared_distances(points, squared_norms, points[chosen[:1]]).squeeze(1)
    nearest[chosen[0]] = 0.0
    used = torch.zeros(num_points, dtype=torch.bool, device=points.device)
    used[chosen[0]] = True
    done = 1
    while done < k:
        mass = weights * nearest
        mass[used] = 0.0
        if int((mass > 0).sum()) < min(block, k - done):  # the weighted points are covered
            mass = mass + (~used).to(torch.float32) * 1e-30
        if block == 1:
            draws = torch.multinomial(mass, trials, replacement=True, generator=generator)
            distances = torch.minimum(_squared_distances(points, squared_norms, points[draws]).T, nearest)
            best = int(torch.argmin(distances @ weights))
            picked, nearest = draws[best : best + 1], distances[best]
        else:
            picked = torch.multinomial(mass, min(block, k - done), replacement=False, generator=generator)
            distances, _ = _nearest_of(points, squared_norms, picked)
            nearest = torch.minimum(nearest, distances)
        chosen[done : done + picked.numel()] = picked
        used[picked] = True
        nearest[picked] = 0.0
        done += picked.numel()
    return chosen


def _squared_distances(x: Tensor, squared_norms: Tensor, centres: Tensor) -> Tensor:
    """(M, c) squared Euclidean distances of every row of ``x`` to every centre, clamped at 0."""
    products = x @ centres.T
    distances = squared_norms[:, None] + (centres * centres).sum(dim=1)[None, :] - 2.0 * products
    return distances.clamp_(min=0.0)


def _nearest_of(x: Tensor, squared_norms: Tensor, picked: Tensor) -> tuple[Tensor, Tensor]:
    """For every row of ``x``: the squared distance to the nearest of rows ``picked`` and its position in
    ``picked``, computed in blocks of at most ``DISTANCE_BLOCK`` entries."""
    num_points = x.shape[0]
    rows = max(1, DISTANCE_BLOCK // max(1, picked.numel()))
    distances = torch.empty(num_points, dtype=torch.float32, device=x.device)
    closest = torch.empty(num_points, dtype=torch.long, device=x.device)
    centres = x[picked]
    for start in range(0, num_points, rows):
        block = _squared_distances(x[start : start + rows], squared_norms[start : start + rows], centres)
        distances[start : start + rows], closest[start : start + rows] = block.min(dim=1)
    return distances, closest


def _top_up(chosen: Tensor, num_points: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fewer candidates than k (data with few distinct values): add uniform draws among the others."""
    taken = chosen.cpu().numpy().astype(np.int64)
    rest = np.setdiff1d(np.arange(num_points), taken)
    extra = rng.choice(rest, size=k - taken.size, replace=False)
    return np.concatenate([taken, extra])
