"""Planning a conversion: hold-out split, seeded shuffle, and the cut into shards.

Everything here is a pure function of the sorted listing and the parameters, so an interrupted conversion
re-plans exactly the same shards when it is run again. The planned global index of an input is its
position in the shuffled list (skipped inputs are closed up afterwards, see ``shards.convert``).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clusterssl.shards.format import INT_SIZE
from clusterssl.shards.sources import InputItem
from clusterssl.shards.tario import BLOCK

# Independent random streams derived from the one user seed, so that changing the hold-out fraction
# does not change how a subset is shuffled, and the two subsets are not shuffled alike.
_HOLDOUT_STREAM = 1
_SHUFFLE_STREAMS = {"": 0, "train": 2, "val": 3}


@dataclass(frozen=True)
class ShardPlan:
    """Shard ``number`` holds the shuffled inputs ``[start, stop)`` (= their planned global indices)."""

    number: int
    start: int
    stop: int


def stratified_holdout(
    items: Sequence[InputItem], fraction: float, seed: int
) -> tuple[list[InputItem], list[InputItem]]:
    """Split into (train, val): ``round(fraction × n_c)`` inputs of every class ``c`` go to val.

    Unlabelled inputs form a class of their own. Both lists keep the listing's (sorted) order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"hold-out fraction must be in (0, 1), got {fraction}")
    by_label: dict[int, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        by_label[item.label].append(position)
    rng = np.random.default_rng([seed, _HOLDOUT_STREAM])
    in_val = np.zeros(len(items), dtype=bool)
    for label in sorted(by_label):
        members = np.asarray(by_label[label])
        n_val = int(np.floor(fraction * len(members) + 0.5))
        in_val[rng.permutation(members)[:n_val]] = True
    train = [item for item, val in zip(items, in_val, strict=True) if not val]
    val = [item for item, val in zip(items, in_val, strict=True) if val]
    return train, val


def shuffled(items: Sequence[InputItem], seed: int, subset: str = "") -> list[InputItem]:
    """The seeded permutation that decides which shard (and planned index) each input gets."""
    order = np.random.default_rng([seed, _SHUFFLE_STREAMS[subset]]).permutation(len(items))
    return [items[i] for i in order]


def _member_bytes(size: int) -> int:
    return BLOCK + -(-size // BLOCK) * BLOCK


def estimated_sample_bytes(item: InputItem) -> int:
    """Tar bytes of one sample: the image plus the cls/label/index members and the src member."""
    return _member_bytes(item.size) + 3 * _member_bytes(INT_SIZE) + _member_bytes(len(item.ref.encode()))


def plan_shards(
    items: Sequence[InputItem], samples_per_shard: int | None, bytes_per_shard: int | None
) -> list[ShardPlan]:
    """Cut the shuffled inputs into consecutive shards; a new shard starts when adding the next input
    would pass either limit (a shard always holds at least one input)."""
    if samples_per_shard is None and bytes_per_shard is None:
        raise ValueError("give samples_per_shard and/or bytes_per_shard")
    if bytes_per_shard is None:  # a count alone: no need to estimate every sample's bytes
        assert samples_per_shard is not None
        step = max(samples_per_shard, 1)
        return [ShardPlan(n, s, min(s + step, len(items))) for n, s in enumerate(range(0, len(items), step))]
    plans: list[ShardPlan] = []
    start, size = 0, 0
    for position, item in enumerate(items):
        sample_bytes = estimated_sample_bytes(item)
        count = position - start
        full = (samples_per_shard is not None and count >= samples_per_shard) or (
            count > 0 and size + sample_bytes > bytes_per_shard
        )
        if full:
            plans.append(ShardPlan(len(plans), start, position))
            start, size = position, 0
        size += sample_bytes
    if start < len(items):
        plans.append(ShardPlan(len(plans), start, len(items)))
    return plans


LISTING_HASH_BLOCK = 4096


def listing_hash(items: Sequence[InputItem], classes: Sequence[str]) -> str:
    """Identifies the inputs (references, labels, sizes) so a resumed run can tell it has the same data."""
    digest = hashlib.sha256()
    for name in classes:
        digest.update(f"class\t{name}\n".encode("utf-8", "surrogateescape"))
    # a block of lines per update: one update per item is slow, one for all would hold the whole listing
    # again as text (measured: 172 MiB at the peak for 1.28 million ImageNet-like inputs, 0.7 this way)
    for block in range(0, len(items), LISTING_HASH_BLOCK):
        lines = "".join(
            [f"{item.ref}\t{item.label}\t{item.size}\n" for item in items[block : block + LISTING_HASH_BLOCK]]
        )
        digest.update(lines.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
