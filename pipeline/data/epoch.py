"""The plan of one epoch: which sample fills every batch slot of every rank, decided before reading.

    shards ──(permute from (seed, epoch))──► one sequence of (shard, position) entries
           ──(shuffle within windows of ``window`` entries of a shard)──► epoch sequence of T entries
           ──(contiguous, nearly equal parts)──► rank r: n_r entries, padded to num_batches × batch_size
           ──(contiguous runs of whole batches)──► unit (worker) w of rank r

* Without resampling the epoch sequence holds every sample of the shard set once, or ``repeats[i]``
  times when a repeats array is given (0 skips sample i before anything is read; 2 yields it twice, with
  different augmentations since the repeat number is part of the augmentation key).
* With ``samples_per_epoch=M`` shards are drawn at random (with replacement, in proportion to their
  sizes) until M samples are gathered.
* Every rank gets ``ceil(ceil(T / world) / batch)`` batches. A rank with fewer entries fills its last
  slots with copies of its first samples, marked padding (index −1 in the Batch), so DDP never waits on a
  rank that ran out of data.
* Units are contiguous runs of the rank's sequence in whole batches: unit w holds batches
  ``j ≡ w (mod units)``; the rank yields batch 0 of unit 0, batch 0 of unit 1, …, so a worker that owns
  a unit reads its shards sequentially, and batch j's content does not depend on which process builds it.

Everything here is a pure function of (shard counts, seed, epoch, world size, units, batch size, …).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clusterssl.errors import PipelineError

DEFAULT_WINDOW = 1024
"""Entries shuffled together inside a shard: bounds what a streaming reader buffers."""
PADDING_REPEAT = 1 << 40
"""Repeat numbers of padding copies start here, so their augmentations differ from the originals'."""


@dataclass(frozen=True)
class EpochSequence:
    """All entries of the epoch, in order, over every rank: T = len(shard)."""

    shard: np.ndarray  # (T,) int64, position in the ShardSet's shard list
    position: np.ndarray  # (T,) int64, sample position inside the shard
    repeat: np.ndarray  # (T,) int64, 0 for a sample's first occurrence in the epoch, 1 for the second …

    def __len__(self) -> int:
        return len(self.shard)


def _rng(seed: int, epoch: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, epoch, salt])


def _occurrences(groups: np.ndarray) -> np.ndarray:
    """For each element, how many equal elements precede it (0 for the first occurrence)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(groups)]))
    occurrence = np.empty(len(groups), np.int64)
    occurrence[order] = np.arange(len(groups)) - run_start
    return occurrence


def _shard_entries(
    order: np.ndarray, counts: np.ndarray, first_index: np.ndarray, repeats: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shard, position, block) of the shards in ``order`` laid end to end; ``block`` numbers each
    shard visit, so a shard drawn twice forms two blocks."""
    sizes = counts[order]
    shard = np.repeat(order, sizes)
    block = np.repeat(np.arange(len(order)), sizes)
    position = np.arange(len(shard)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    if repeats is not None:
        times = repeats[first_index[shard] + position]
        shard, position, block = np.repeat(shard, times), np.repeat(position, times), np.repeat(block, times)
    return shard, position, block


def _shuffle_windows(block: np.ndarray, rng: np.random.Generator, window: int) -> np.ndarray:
    """A permutation that shuffles entries only within windows of ``window`` consecutive entries of
    the same block (entries arrive grouped by block)."""
    starts = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
    within = np.arange(len(block)) - np.repeat(starts, np.diff(np.r_[starts, len(block)]))
    window_id = block * (1 + int(within.max(initial=0)) // window) + within // window
    return np.lexsort((rng.random(len(block)), window_id))


def epoch_sequence(
    counts: Sequence[int],
    first_index: Sequence[int],
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    samples_per_epoch: int | None = None,
    repeats: np.ndarray | None = None,
    num_indices: int | None = None,
    window: int = DEFAULT_WINDOW,
) -> EpochSequence:
    """The epoch's entries over all ranks (see the module docstring)."""
    counts_a = np.asarray(counts, dtype=np.int64)
    first_a = np.asarray(first_index, dtype=np.int64)
    if len(counts_a) == 0 or counts_a.sum() == 0:
        raise PipelineError("the shard set holds no samples")
    if window < 1:
        raise PipelineError(f"the shuffle window must be at least 1, got {window}")
    rng = _rng(seed, epoch, 1)
    if samples_per_epoch is not None:
        if repeats is not None:
            raise PipelineError("repeats and samples_per_epoch cannot be combined")
        if samples_per_epoch < 1:
            raise PipelineError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        if not shuffle:
            raise PipelineError("samples_per_epoch draws shards at random; it needs shuffle=True")
        # Enough draws that their sizes almost surely reach M, then keep the prefix that does.
        mean = float(counts_a.mean())
        draws = rng.choice(
            len(counts_a), size=math.ceil(samples_per_epoch / mean) * 2 + 4, p=counts_a / counts_a.sum()
        )
        needed = int(np.searchsorted(np.cumsum(counts_a[draws]), samples_per_epoch)) + 1
        while needed > len(draws):  # vanishingly rare: draw more
            draws = np.r_[draws, rng.choice(len(counts_a), size=len(draws), p=counts_a / counts_a.sum())]
            needed = int(np.searchsorted(np.cumsum(counts_a[draws]), samples_per_epoch)) + 1
        order = draws[:needed]
    else:
        order = rng.permutation(len(counts_a)) if shuffle else np.arange(len(counts_a))
        if repeats is not None:
            repeats = np.asarray(repeats)
            expected = num_indices if num_indices is not None else int((first_a + counts_a).max())
            if repeats.shape != (expected,):
                raise PipelineError(
                    f"repeats must have shape ({expected},), one count per sample; got {repeats.shape}"
                )
            if repeats.dtype.kind not in "iu" or (repeats < 0).any():
                raise PipelineError("repeats must be non-negative integers")
            repeats = repeats.astype(np.int64)
    shard, position, block = _shard_entries(order, counts_a, first_a, repeats)
    if shuffle and len(shard):
        permutation = _shuffle_windows(block, rng, window)
        shard, position = shard[permutation], position[permutation]
    if samples_per_epoch is not None:
        shard, position = shard[:samples_per_epoch], position[:samples_per_epoch]
    repeat = _occurrences(first_a[shard] + position) if len(shard) else np.zeros(0, np.int64)
    return EpochSequence(shard, position, repeat)


@dataclass(frozen=True)
class RankPlan:
    """One rank's epoch: ``num_batches`` batches of ``batch_size`` slots, slot arrays in rank order."""

    rank: int
    world_size: int
    num_units: int
    batch_size: int
    num_batches: int
    epoch_total: int
    """T: entries in the whole epoch over all ranks (padding excluded)."""
    shard: np.ndarray  # (num_batches * batch_size,) int64
    position: np.ndarray  # (…,) int64
    index: np.ndarray  # (…,) int64 global index of the sample read (for padding: of the copied sample)
    repeat: np.ndarray  # (…,) int64 augmentation key; padding copies get PADDING_REPEAT + slot
    padding: np.ndarray  # (…,) bool

    @property
    def num_real(self) -> int:
        return int((~self.padding).sum())

    def unit_of(self, batch: int) -> int:
        return batch % self.num_units

    def unit_batches(self, unit: int) -> int:
        """How many batches unit ``unit`` builds."""
        return self.num_batches // self.num_units + (unit < self.num_batches % self.num_units)

    def slots(self, batch: int) -> slice:
        """The rank-sequence slots of batch ``batch`` (unit batch // units of unit batch % units)."""
        if not 0 <= batch < self.num_batches:
            raise IndexError(f"batch {batch} of {self.num_batches}")
        first = int(self._row(batch % self.num_units, np.array([batch // self.num_units]))[0])
        return slice(first * self.batch_size, (first + 1) * self.batch_size)

    def _row(self, unit: int, nth: np.ndarray) -> np.ndarray:
        """Where the nth batches of a unit sit in the rank sequence, in batches (units are contiguous)."""
        base, extra = divmod(self.num_batches, self.num_units)
        return unit * base + min(unit, extra) + nth

    def unit_slots(self, unit: int, start_batch: int = 0) -> np.ndarray:
        """Every slot unit ``unit`` reads, in order, for its batches from ``start_batch`` on."""
        batches = np.arange(unit, self.num_batches, self.num_units)
        batches = batches[batches >= start_batch]
        first = self._row(unit, batches // self.num_units)
        return (first[:, None] * self.batch_size + np.arange(self.batch_size)[None, :]).ravel()


def plan_rank(
    sequence: EpochSequence,
    first_index: Sequence[int],
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    num_units: int = 1,
) -> RankPlan:
    """Rank ``rank``'s share of the epoch, padded to the common batch count."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank} is not in a world of size {world_size}")
    if batch_size < 1 or num_units < 1:
        raise PipelineError("batch_size and the number of workers must be positive")
    total = len(sequence)
    if total < world_size:
        raise PipelineError(f"the epoch has {total} samples, fewer than the {world_size} ranks")
    start, stop = total * rank // world_size, total * (rank + 1) // world_size
    real = stop - start
    num_batches = math.ceil(math.ceil(total / world_size) / batch_size)
    slots = num_batches * batch_size
    take = np.arange(slots)
    source = np.where(take < real, take, (take - real) % real) + start
    padding = take >= real
    shard, position = sequence.shard[source], sequence.position[source]
    first = np.asarray(first_index, dtype=np.int64)
    repeat = np.where(padding, PADDING_REPEAT + take, sequence.repeat[source])
    return RankPlan(
        rank=rank,
        world_size=world_size,
        num_units=num_units,
        batch_size=batch_size,
        num_batches=num_batches,
        epoch_total=total,
        shard=shard,
        position=position,
        index=first[shard] + position,
        repeat=repeat,
        padding=padding,
    )
