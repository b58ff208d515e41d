"""The values on the arrows between the pipeline and the methods: ``Batch`` in, ``LossOutput`` out."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

PADDING_INDEX = -1
"""``Batch.index`` value of a padded sample: a copy of a real one added so that every rank yields the
same number of full batches. Losses may use it; metrics, memory banks and evaluation must ignore it."""


@dataclass
class Batch:
    """One batch of multi-crop views.

    views:      list of (batch, 3, H_v, W_v) float tensors, normalised; the first ``num_global`` are the
                global crops (all the same size), the rest the local crops.
    labels:     (batch,) int64 class ids, or None for unlabelled data (-1 marks an unknown label).
    index:      (batch,) int64 global sample index 0..N-1 assigned at conversion; ``PADDING_INDEX`` (-1)
                for padding.
    num_global: how many of ``views`` are global crops.
    """

    views: list[Tensor]
    labels: Tensor | None
    index: Tensor
    num_global: int = 2
    host_index: np.ndarray | None = field(default=None, repr=False, compare=False)
    """A host copy of ``index``, when the loader had one: methods that draw per-sample randomness on the host
    (iBOT's masks) read it without waiting for the device."""

    def __post_init__(self) -> None:
        if not self.views:
            raise ValueError("a Batch needs at least one view")
        if not 0 < self.num_global <= len(self.views):
            raise ValueError(f"num_global={self.num_global} with {len(self.views)} views")

    @property
    def size(self) -> int:
        return int(self.index.shape[0])

    @property
    def valid(self) -> Tensor:
        """(batch,) bool: True for real samples, False for padding."""
        return self.index != PADDING_INDEX

    @property
    def global_views(self) -> list[Tensor]:
        return self.views[: self.num_global]

    @property
    def local_views(self) -> list[Tensor]:
        return self.views[self.num_global :]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return Batch(
            views=[v.to(device, non_blocking=non_blocking) for v in self.views],
            labels=None if self.labels is None else self.labels.to(device, non_blocking=non_blocking),
            index=self.index.to(device, non_blocking=non_blocking),
            num_global=self.num_global,
            host_index=self.host_index,
        )


@dataclass
class LossOutput:
    """What a method's forward returns: the scalar loss to back-propagate and its metrics, detached
    0-dim float tensors left on the device (the trainer reads them at its logging interval)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class FeatureBank:
    """Features of every training sample, as the extraction pass returns them to a method.

    features: (N, D) float32 array (possibly a read-only memmap); row i belongs to global index i.
    labels:   (N,) int64 class ids (-1 unknown), or None when the data has no labels.

    Under DDP the rows are gathered to rank 0 only: a copy of the whole bank on every rank would cost
    N × D floats each (10 GB for a ResNet-50 on ImageNet) for ranks that never read it. The other ranks
    get ``without_rows(N)``: ``num_samples`` is still N (to size the tensors rank 0 broadcasts), but
    ``features`` has no columns and there are no labels (``holds_rows`` is False).
    """

    features: np.ndarray
    labels: np.ndarray | None = None

    @classmethod
    def without_rows(cls, num_samples: int) -> FeatureBank:
        """The bank of a rank that was not sent the rows: (N, 0) features, no labels."""
        return cls(features=np.empty((num_samples, 0), dtype=np.float32))

    @property
    def num_samples(self) -> int:
        return int(self.features.shape[0])

    @property
    def holds_rows(self) -> bool:
        """Whether this rank holds the features (rank 0, or a single process)."""
        return self.features.shape[1] > 0
