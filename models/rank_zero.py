"""One rank clusters, every rank receives the result: the epoch-start sequence of the clustering methods.

DeepCluster, DeepCluster-v2 and PCL cluster the features of the whole training set at the start of an
epoch. k-means run on several ranks could disagree (thread-order rounding) and would cost every rank the
time, so rank 0 clusters alone, logs the clustering's statistics, and broadcasts the tensors it filled.
Rank 0 is also the only rank the extraction pass hands the bank's rows to (``TrainContext.extract``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from clusterssl.models import collectives
from clusterssl.models.method import TrainContext


def cluster_on_rank_zero(
    ctx: TrainContext, cluster: Callable[[], Mapping[str, float]], results: Sequence[Tensor]
) -> None:
    """On rank 0, ``cluster()`` fills ``results`` in place and returns metrics, which rank 0 logs; then
    every rank receives rank 0's ``results``.

    The other ranks wait through ``ctx.on_rank_zero``: on a group whose timeout is sized for clustering
    (minutes to hours at ImageNet scale, where one training step's collective timeout would end the job),
    and stopped with one line if rank 0 fails. Every rank must call this with tensors of the same shapes
    and dtypes, in the same order (they are broadcast one by one); other ranks' values are overwritten.
    """
    metrics = ctx.on_rank_zero(cluster, what="the clustering")
    if ctx.rank == 0:
        ctx.log_metrics(metrics)
    for tensor in results:
        collectives.broadcast_(tensor)
