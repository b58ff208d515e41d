"""The cross-entropy both SwAV and DINO average: each target distribution against every *other* view."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def cross_entropy_to_other_views(
    targets: Sequence[Tensor], target_views: Sequence[int], log_probs: Sequence[Tensor]
) -> Tensor:
    """Mean over pairs (i, v), v ≠ target_views[i], of ``mean_b −Σ_k targets[i][b, k] · log_probs[v][b, k]``.

    targets:      T tensors (batch, K), distributions (SwAV's codes, DINO's teacher probabilities).
    target_views: the view each target was computed from; its own prediction is left out.
    log_probs:    V tensors (batch, K), every view's predicted log-distribution.

    Every target meets V − 1 views, so the mean over pairs is the mean over targets of their mean over
    other views. The sum over other views is taken as ``Σ_v log p_v − log p_own`` (the cross-entropy is
    linear in the log-probabilities): O(T + V) passes over (batch, K) instead of one per pair, which is
    what the double loop of the originals costs. No loop over samples.
    """
    num_views = len(log_probs)
    if num_views < 2:
        raise ValueError(f"cross-entropy to other views needs at least 2 views, got {num_views}")
    if len(targets) != len(target_views):
        raise ValueError(f"{len(targets)} targets for {len(target_views)} target views")
    if not all(0 <= view < num_views for view in target_views):
        raise ValueError(f"target views {list(target_views)} outside 0..{num_views - 1}")
    summed = log_probs[0]
    for log_prob in log_probs[1:]:
        summed = summed + log_prob
    total = None
    for target, view in zip(targets, target_views, strict=True):
        term = -(target * (summed - log_probs[view])).sum(dim=-1).mean()
        total = term if total is None else total + term
    return total / (len(targets) * (num_views - 1))
