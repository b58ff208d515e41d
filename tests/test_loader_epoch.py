"""The epoch plan: exact coverage, equal batch counts, repeats, resampling, determinism, unit layout."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from clusterssl.errors import PipelineError
from clusterssl.pipeline.data.epoch import PADDING_REPEAT, epoch_sequence, plan_rank

COUNTS = [7, 5, 9, 3, 11]  # uneven shards, 35 samples
FIRST = [0, 7, 12, 21, 24]


def _indices(sequence) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(FIRST)[sequence.shard] + sequence.position


def test_every_sample_once_in_a_new_order_each_epoch() -> None:
    orders = []
    for epoch in range(3):
        sequence = epoch_sequence(COUNTS, FIRST, seed=4, epoch=epoch, window=4)
        indices = _indices(sequence)
        assert sorted(indices.tolist()) == list(range(35))
        assert (sequence.repeat == 0).all()
        orders.append(indices.tolist())
    assert orders[0] != orders[1] != orders[2]
    again = epoch_sequence(COUNTS, FIRST, seed=4, epoch=1, window=4)
    assert _indices(again).tolist() == orders[1]  # deterministic
    assert _indices(epoch_sequence(COUNTS, FIRST, seed=5, epoch=1, window=4)).tolist() != orders[1]


def test_unshuffled_epoch_is_the_stored_order() -> None:
    sequence = epoch_sequence(COUNTS, FIRST, seed=4, epoch=3, shuffle=False)
    assert _indices(sequence).tolist() == list(range(35))


def test_shuffle_stays_within_windows_of_a_shard() -> None:
    sequence = epoch_sequence(COUNTS, FIRST, seed=1, epoch=0, window=4)
    # Shards are read one after the other, each in windows of 4 positions: a window's samples are
    # contiguous in the sequence.
    blocks = [sequence.shard[i] * 100 + sequence.position[i] // 4 for i in range(len(sequence))]
    runs = [b for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
    assert len(runs) == len(set(runs))
    assert len({int(s) for s in sequence.shard[:7]}) <= 2  # shard order permuted, not interleaved


def test_repeats_are_honoured_exactly() -> None:
    repeats = np.array([i % 3 for i in range(35)])  # 0, 1, 2, 0, 1, 2, …
    sequence = epoch_sequence(COUNTS, FIRST, seed=0, epoch=0, repeats=repeats, num_indices=35)
    counted = Counter(_indices(sequence).tolist())
    assert all(counted[i] == repeats[i] for i in range(35))
    assert len(sequence) == repeats.sum()
    for index in np.flatnonzero(repeats == 2):
        assert sorted(sequence.repeat[_indices(sequence) == index].tolist()) == [0, 1]


def test_resampling_draws_a_fixed_number() -> None:
    sequence = epoch_sequence(COUNTS, FIRST, seed=0, epoch=2, samples_per_epoch=50)
    indices = _indices(sequence)
    assert len(indices) == 50 and indices.min() >= 0 and indices.max() < 35
    pairs = set(zip(indices.tolist(), sequence.repeat.tolist(), strict=True))
    assert len(pairs) == 50  # a sample drawn twice gets a new repeat number
    assert (
        _indices(epoch_sequence(COUNTS, FIRST, seed=0, epoch=3, samples_per_epoch=50)).tolist()
        != indices.tolist()
    )


@pytest.mark.parametrize(("world", "batch", "units"), [(2, 4, 1), (2, 4, 2), (3, 5, 2), (4, 8, 3)])
def test_ranks_cover_the_epoch_once_with_equal_batch_counts(world: int, batch: int, units: int) -> None:
    sequence = epoch_sequence(COUNTS, FIRST, seed=2, epoch=0)
    plans = [
        plan_rank(sequence, FIRST, rank=r, world_size=world, batch_size=batch, num_units=units)
        for r in range(world)
    ]
    assert len({p.num_batches for p in plans}) == 1
    real = np.concatenate([p.index[~p.padding] for p in plans])
    assert sorted(real.tolist()) == list(range(35))
    for p in plans:
        assert len(p.index) == p.num_batches * batch
        # padding copies real samples of the same rank and gets distinct repeat numbers
        assert set(p.index[p.padding].tolist()) <= set(p.index[~p.padding].tolist())
        assert (p.repeat[p.padding] >= PADDING_REPEAT).all()
        # batches partition the slots; each unit's batches are contiguous slots
        slots = np.concatenate([np.arange(len(p.index))[p.slots(j)] for j in range(p.num_batches)])
        assert sorted(slots.tolist()) == list(range(len(p.index)))
        for unit in range(units):
            mine = p.unit_slots(unit)
            assert len(mine) == p.unit_batches(unit) * batch
            assert (np.diff(mine) == 1).all()


def test_plan_errors_are_clear() -> None:
    sequence = epoch_sequence([2], [0], seed=0, epoch=0)
    with pytest.raises(PipelineError, match="fewer than the 3 ranks"):
        plan_rank(sequence, [0], rank=0, world_size=3, batch_size=4)
    with pytest.raises(PipelineError, match="shape"):
        epoch_sequence(COUNTS, FIRST, seed=0, epoch=0, repeats=np.ones(10, np.int64), num_indices=35)
    with pytest.raises(PipelineError, match="cannot be combined"):
        epoch_sequence(COUNTS, FIRST, seed=0, epoch=0, repeats=np.ones(35, np.int64), samples_per_epoch=5)
