"""Sinkhorn-Knopp equipartition of samples over prototypes (SwAV's online code computation).

As in SwAV (Caron et al., 2020) and facebookresearch/swav: ``Q = exp(s/ε)ᵀ`` is a K × B matrix worked on in float32; it is normalised by its total
once, then each iteration divides every prototype row by its sum and by K, then every sample column by its
sum and by B; finally it is multiplied by B and transposed back. Each sample's code then sums to 1 and each
prototype receives about B/K of the mass. Under DDP the total and the row sums are all-reduced and B is the
global batch (all ranks' rows), so the result is that of one process on the concatenated batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clusterssl.models import collectives


@torch.no_grad()
def sinkhorn(
    scores: Tensor, epsilon: float = 0.05, iterations: int = 3, *, distribute: bool = True
) -> Tensor:
    """Soft assignments of samples to prototypes under an equipartition constraint.

    scores:     (batch, prototypes) similarities, typically ``z · cᵀ`` of L2-normalised vectors.
    epsilon:    entropy regularisation; lower gives sharper codes.
    iterations: row/column normalisation rounds (3 in SwAV).
    distribute: treat the rows of every rank as one global batch (collectives only when world_size > 1).
                Turn off to run on one rank's scores alone.
    Returns (batch, prototypes) float32 codes, each row summing to 1.

    Finite whenever every sample has some score within ~87·ε of that prototype's best score (float32's
    exp range); for cosine scores in [−1, 1] that always holds when ε ≥ 0.023.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn expects (batch, prototypes) scores, got shape {tuple(scores.shape)}")
    reduce_sum = collectives.all_reduce_sum if distribute else _identity
    reduce_max = collectives.all_reduce_max if distribute else _identity

    # Autocast off and float32: exp(s/ε) spans e^(±1/ε) ≈ e^(±20) at ε = 0.05, beyond what bf16/fp16 keep.
    with torch.autocast(device_type=scores.device.type, enabled=False):
        scores = scores.detach().float()
        # Stabiliser: subtract each prototype's maximum score over the global batch before exp(). Scaling a
        # prototype row of Q by a constant is undone exactly by the first row normalisation, so the codes
        # are unchanged; but exp() can no longer overflow, and every row keeps an entry equal to 1. (A single
        # global maximum, the usual stabiliser, can underflow whole rows to 0 for small ε, e.g. 0.01, and
        # then 0/0 gives NaN.) The maximum is over all ranks: a per-rank one would scale ranks differently.
        shift = reduce_max(scores.max(dim=0).values)  # (K,)
        q = torch.exp((scores - shift) / epsilon).t()  # (K, B_local): prototypes × samples
        num_prototypes = q.shape[0]
        # The total mass and the global batch B in one collective. B is counted rather than taken as
        # world_size × local rows, so ranks may hold different numbers of rows (a SwAV queue that fills
        # at a different step on a rank that saw padding) and the codes are still the global batch's.
        total, global_batch = reduce_sum(torch.stack([q.sum(), q.new_tensor(float(q.shape[1]))]))
        q /= total
        for _ in range(iterations):
            # Each prototype row gets total mass 1/K over the global batch ...
            q /= reduce_sum(q.sum(dim=1, keepdim=True))
            q /= num_prototypes
            # ... then each sample column gets mass 1/B (columns are local: no collective needed).
            q /= q.sum(dim=0, keepdim=True)
            q /= global_batch
        q *= global_batch  # columns sum to 1: each sample's code is a distribution over prototypes
        return q.t()


def _identity(tensor: Tensor) -> Tensor:
    return tensor
