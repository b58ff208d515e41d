"""``build_loader``: the one entry point the trainer, the extraction pass and outside scripts use.

    loader = build_loader("data/train", "swav", 64, rank=r, world_size=w, epoch=e)
    len(loader)                 # batches this loader yields (the same on every rank)
    for batch in loader:        # Batch(views=[global…, local…], labels, index, num_global)
        ...
    loader.stats                # samples, padded, skipped (corrupt) with where

A loader covers one epoch (or its remainder from ``start_batch``); build a new one per epoch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from clusterssl.errors import PipelineError
from clusterssl.models.types import PADDING_INDEX, Batch
from clusterssl.pipeline.data.epoch import DEFAULT_WINDOW, RankPlan, epoch_sequence, plan_rank
from clusterssl.pipeline.data.shardset import ShardSet, resolve_shards
from clusterssl.pipeline.data.spec import AugmentConfig, MultiCropSpec, resolve_spec
from clusterssl.pipeline.data.torch_backend import WorkerBatch

BACKENDS = ("auto", "dali", "torch")
MAX_RECORDED_SKIPS = 1000


class CorruptSampleWarning(UserWarning):
    """Emitted once per loader when corrupt samples are skipped."""


@dataclass
class LoaderStats:
    """Counters of what one loader yielded."""

    batches: int = 0
    samples: int = 0
    """Real samples yielded (padding excluded)."""
    padded: int = 0
    """Padding slots yielded (index −1): plan padding plus the slots of skipped samples."""
    skipped: int = 0
    """Corrupt samples skipped."""
    skipped_where: list[tuple[str, str]] = field(default_factory=list)
    """(where, reason) of the skipped samples (the first MAX_RECORDED_SKIPS)."""

    def as_dict(self) -> dict[str, object]:
        return {
            "batches": self.batches,
            "samples": self.samples,
            "padded": self.padded,
            "skipped": self.skipped,
            "skipped_where": [f"{where}: {reason}" for where, reason in self.skipped_where],
        }


def default_device() -> torch.device:
    """This process's GPU when CUDA works (the local rank's under torchrun or srun, not every rank on GPU
    0), else the CPU."""
    from clusterssl.pipeline.train.world import DistributedEnv, resolve_device

    return resolve_device("auto", DistributedEnv.from_environment())


def choose_backend(backend: str, device: torch.device, shardset: ShardSet) -> str:
    """``auto``: DALI when it imports, the views go to a GPU and the shards are local with indexes;
    otherwise torch. (On a CPU-only machine the torch backend is several times faster than DALI's CPU
    operators — see the README's performance section — so auto does not pick DALI there.)"""
    if backend not in BACKENDS:
        raise PipelineError(f"unknown loader backend {backend!r}; known: {', '.join(BACKENDS)}")
    from clusterssl.pipeline.data.dali_backend import dali_available

    if backend == "auto":
        return "dali" if dali_available() and device.type == "cuda" and shardset.indexed else "torch"
    if backend == "dali" and not dali_available():
        raise PipelineError(
            "backend 'dali' needs nvidia-dali, which is not installed here (DALI ships Linux wheels only: "
            "pip install nvidia-dali-cuda130); the torch backend runs everywhere: use backend='torch'"
        )
    if backend == "dali" and not shardset.indexed:
        raise PipelineError(
            "backend 'dali' reads local shards with their .idx files; streamed or unindexed shards need backend='torch'"
        )
    return backend


class EpochLoader:
    """An iterable of ``Batch`` covering one epoch of one rank (from ``start_batch``)."""

    def __init__(
        self,
        shardset: ShardSet,
        spec: MultiCropSpec,
        plan: RankPlan,
        *,
        backend: str,
        num_workers: int,
        seed: int,
        epoch: int,
        device: torch.device,
        start_batch: int,
        pixel_ops: str,
        cache_dir: str | Path | None,
    ) -> None:
        self.shardset, self.spec, self.plan = shardset, spec, plan
        self.backend, self.num_workers = backend, num_workers
        self.seed, self.epoch, self.device = seed, epoch, device
        self.start_batch = start_batch
        self.pixel_ops = pixel_ops
        self.cache_dir = cache_dir
        self.stats = LoaderStats()
        self._warned = False

    @property
    def num_batches(self) -> int:
        """Batches in the whole epoch (every rank has this many)."""
        return self.plan.num_batches

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    def __len__(self) -> int:
        return self.plan.num_batches - self.start_batch

    def _batches(self) -> Iterator[WorkerBatch]:
        if self.backend == "dali":
            from clusterssl.pipeline.data.dali_backend import iterate_dali

            return iterate_dali(
                self.shardset,
                self.plan,
                self.spec,
                seed=self.seed,
                epoch=self.epoch,
                start_batch=self.start_batch,
                num_threads=self.num_workers,
                device=self.device,
                cache_dir=self.cache_dir,
            )
        from clusterssl.pipeline.data.torch_backend import BatchBuilder, iterate_torch

        on_device = self.pixel_ops == "device" or (self.pixel_ops == "auto" and self.device.type == "cuda")
        builder = BatchBuilder(
            self.shardset,
            self.plan,
            self.spec,
            seed=self.seed,
            epoch=self.epoch,
            pixel_ops_here=not on_device,
        )
        return iterate_torch(
            builder, start_batch=self.start_batch, num_workers=self.num_workers, device=self.device
        )

    def __iter__(self) -> Iterator[Batch]:
        for batch in self._batches():
            self._count(batch)
            yield Batch(
                views=batch.views,
                labels=batch.labels,
                index=batch.index,
                num_global=self.spec.num_global,
                host_index=batch.index.numpy() if batch.index.device.type == "cpu" else None,
            )

    def _count(self, batch: WorkerBatch) -> None:
        padded = int((batch.index == PADDING_INDEX).sum())
        self.stats.batches += 1
        self.stats.padded += padded
        self.stats.samples += int(batch.index.numel()) - padded
        if batch.corrupt:
            self.stats.skipped += len(batch.corrupt)
            room = MAX_RECORDED_SKIPS - len(self.stats.skipped_where)
            self.stats.skipped_where.extend(batch.corrupt[: max(0, room)])
            if not self._warned:
                self._warned = True
                where, reason = batch.corrupt[0]
                warnings.warn(
                    f"skipping corrupt sample {where}: {reason}; its slot is padded, and further skips are "
                    "counted in the loader's stats without another warning",
                    CorruptSampleWarning,
                    stacklevel=3,
                )


def build_loader(
    data: ShardSet | str | Path | Sequence[str | Path],
    spec: MultiCropSpec | AugmentConfig | str,
    batch_size: int,
    *,
    backend: Literal["auto", "dali", "torch"] | str = "auto",
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    device: torch.device | str | None = None,
    samples_per_epoch: int | None = None,
    repeats: np.ndarray | None = None,
    start_batch: int = 0,
    shuffle: bool = True,
    manifest: str | Path | None = None,
    shuffle_window: int = DEFAULT_WINDOW,
    pixel_ops: Literal["auto", "worker", "device"] | str = "auto",
    cache_dir: str | Path | None = None,
) -> EpochLoader:
    """One epoch of multi-crop batches for rank ``rank`` of ``world_size``.

    data:         a shard directory, its manifest.json, or shard URLs (brace patterns; ``pipe:`` URLs with
                  the torch backend, then ``manifest=`` gives the counts)
    spec:         a MultiCropSpec, an AugmentConfig or a preset name (swav, dino, eval at full size)
    backend:      dali, torch, or auto (DALI on a GPU when it imports, else torch)
    num_workers:  torch DataLoader workers, or DALI CPU threads (default: the CPU count, at most 8)
    seed, epoch:  the shard order, the shuffle and every augmentation derive from these
    device:       where the views are delivered (default: cuda when available)
    samples_per_epoch: draw this many samples from randomly chosen shards instead of one exact pass
    repeats:      (N,) how many times each global index appears in this epoch (0 skips it)
    start_batch:  resume mid-epoch: the batches from here on are those of an uninterrupted epoch
    shuffle:      False reads shards and samples in stored order (no augmentation randomness changes)
    shuffle_window: samples shuffled together inside a shard (what a streamed shard buffers)
    pixel_ops:    torch backend: where colour/blur/solarise/normalise run — in the workers (auto on CPU)
                  or batched on ``device`` in the main process (auto on GPU)
    """
    spec = resolve_spec(spec)
    device = default_device() if device is None else torch.device(device)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    if num_workers < 0:
        raise PipelineError(f"num_workers must be >= 0, got {num_workers}")
    if pixel_ops not in ("auto", "worker", "device"):
        raise PipelineError(f"pixel_ops must be auto, worker or device, got {pixel_ops!r}")
    shardset = resolve_shards(data, manifest)
    chosen = choose_backend(backend, device, shardset)
    sequence = epoch_sequence(
        shardset.counts,
        [s.first_index for s in shardset.shards],
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        samples_per_epoch=samples_per_epoch,
        repeats=repeats,
        num_indices=shardset.num_indices,
        window=shuffle_window,
    )
    units = 1 if chosen == "dali" else max(1, num_workers)
    plan = plan_rank(
        sequence,
        [s.first_index for s in shardset.shards],
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        num_units=units,
    )
    if not 0 <= start_batch <= plan.num_batches:
        raise PipelineError(f"start_batch {start_batch} is outside the epoch's {plan.num_batches} batches")
    return EpochLoader(
        shardset,
        spec,
        plan,
        backend=chosen,
        num_workers=num_workers,
        seed=seed,
        epoch=epoch,
        device=device,
        start_batch=start_batch,
        pixel_ops=pixel_ops,
        cache_dir=cache_dir,
    )
