"""The DALI backend on the CPU (device_id=None, the same graph a GPU runs): exact epochs, ranks, resume,
repeats, and corrupt data found before DALI would stop on it."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_fixtures import labels_by_index, make_shard_set, spoil_jpeg, truncate_shard

from clusterssl.models.types import Batch
from clusterssl.pipeline.data import integrity
from clusterssl.pipeline.data.integrity import SIDECAR_NAME
from clusterssl.pipeline.data.loader import CorruptSampleWarning, build_loader
from clusterssl.pipeline.data.shardset import ShardInfo
from clusterssl.pipeline.data.spec import MultiCropSpec

SPEC = MultiCropSpec.preset("dino", global_size=24, local_size=12, num_local=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shard_set(tmp_path_factory.mktemp("data") / "shards", 24, 7)  # shards of 7, 7, 7, 3


def real_indices(batches: list[Batch]) -> list[int]:
    return [int(i) for b in batches for i in b.index if i >= 0]


def dali(data: Path, batch_size: int = 4, **kwargs: object) -> list[Batch]:
    return list(build_loader(data, SPEC, batch_size, backend="dali", num_workers=2, device="cpu", **kwargs))


def test_two_ranks_cover_the_epoch_with_equal_batch_counts(shards: Path) -> None:
    per_rank = [dali(shards, 5, rank=r, world_size=2, seed=1) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    assert sorted(real_indices(per_rank[0]) + real_indices(per_rank[1])) == list(range(24))
    labels = {
        int(i): int(label)
        for b in per_rank[0] + per_rank[1]
        for i, label in zip(b.index, b.labels, strict=True)
        if i >= 0
    }
    assert labels == labels_by_index(shards)  # DALI reads them as int64, as the shards reader does


def test_new_order_each_epoch_and_exact_resume(shards: Path) -> None:
    epoch0, epoch1 = dali(shards, seed=2, epoch=0), dali(shards, seed=2, epoch=1)
    assert sorted(real_indices(epoch0)) == sorted(real_indices(epoch1)) == list(range(24))
    assert real_indices(epoch0) != real_indices(epoch1)
    resumed = dali(shards, seed=2, epoch=1, start_batch=4)
    assert len(resumed) == 2
    for a, b in zip(epoch1[4:], resumed, strict=True):
        assert torch.equal(a.index, b.index)
        for va, vb in zip(a.views, b.views, strict=True):
            assert torch.equal(va, vb)


def test_repeats_are_honoured_exactly(shards: Path) -> None:
    repeats = np.array([2, 0, 1] * 8)
    counted = Counter(real_indices(dali(shards, repeats=repeats)))
    assert all(counted[i] == repeats[i] for i in range(24))


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    data = make_shard_set(tmp_path / "bad", 24, 7)
    spoil_jpeg(data, 3)
    truncate_shard(data, 2, 4)  # indices 18, 19, 20 lost
    loader = build_loader(data, SPEC, 4, backend="dali", num_workers=1, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    assert sum(issubclass(w.category, CorruptSampleWarning) for w in caught) == 1
    assert len(batches) == 6 and all(b.size == 4 for b in batches)
    assert sorted(real_indices(batches)) == sorted(set(range(24)) - {3, 18, 19, 20})
    assert loader.stats.skipped == 4 and loader.stats.padded == 4
    reasons = dict(loader.stats.skipped_where)
    assert "bad JPEG" in reasons["shard-000000.tar #3 (index 3)"]
    assert "truncated tar" in reasons["shard-000002.tar #5 (index 19)"]
    assert (data / SIDECAR_NAME).is_file()  # the check is cached next to the manifest


def test_each_rank_checks_only_the_shards_it_reads_and_reports_a_bad_one_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before DALI reads, each rank checks the shards of its own share of the epoch: together the two
    ranks read every shard once, a later epoch reads none (the sidecar), and a corrupt sample in a rank's
    share is reported with the message of the full check."""
    data = make_shard_set(tmp_path / "set", 24, 3)  # 8 shards: the two ranks' shares are disjoint
    loaders = [
        build_loader(data, SPEC, 4, backend="dali", rank=r, world_size=2, num_workers=1, device="cpu")
        for r in range(2)
    ]
    shards = loaders[0].shardset.shards
    shares = [sorted({shards[n].file for n in loader.plan.shard.tolist()}) for loader in loaders]
    spoiled = next(s for s in shards if s.file == shares[1][0])
    spoil_jpeg(data, spoiled.first_index + 1)
    checked: list[str] = []
    check_shard = integrity.check_shard

    def counting(shard: ShardInfo) -> integrity.ShardCheck:
        checked.append(shard.file)
        return check_shard(shard)

    monkeypatch.setattr(integrity, "check_shard", counting)
    warned: list[list[str]] = []
    for loader, share in zip(loaders, shares, strict=True):
        checked.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            list(loader)
        assert sorted(checked) == share
        warned.append([str(w.message) for w in caught if issubclass(w.category, CorruptSampleWarning)])
    assert sorted(shares[0] + shares[1]) == sorted(s.file for s in shards)
    where = spoiled.where(1)
    reason = check_shard(spoiled).reasons[1]
    assert reason.startswith("bad JPEG") and loaders[0].stats.skipped == 0 and warned[0] == []
    assert loaders[1].stats.skipped_where == [(where, reason)] and len(warned[1]) == 1
    assert warned[1][0].startswith(f"skipping corrupt sample {where}: {reason}; ")
    checked.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        dali(data, rank=1, world_size=2, epoch=1)  # another share, every shard of it checked before
    assert checked == []


def test_without_dali_the_dali_backend_is_refused_in_one_line_and_auto_picks_torch(
    shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where nvidia-dali is not installed (DALI ships Linux wheels only), the torch backend is the one."""
    from clusterssl.errors import PipelineError
    from clusterssl.pipeline.data import dali_backend
    from clusterssl.pipeline.data.loader import choose_backend
    from clusterssl.pipeline.data.shardset import resolve_shards

    monkeypatch.setattr(dali_backend, "dali_available", lambda: False)
    shardset = resolve_shards(shards)
    with pytest.raises(PipelineError, match="Linux wheels only") as refused:
        choose_backend("dali", torch.device("cpu"), shardset)
    assert "\n" not in str(refused.value)
    assert choose_backend("auto", torch.device("cuda"), shardset) == "torch"
    assert choose_backend("torch", torch.device("cpu"), shardset) == "torch"
