"""The torch backend end to end: exact epochs over workers and ranks, resume, repeats, corrupt data,
streamed shards (pipe:) read exactly like indexed ones."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_fixtures import make_shard_set, spoil_jpeg, truncate_shard

from clusterssl.models.types import Batch
from clusterssl.pipeline.data.loader import CorruptSampleWarning, build_loader
from clusterssl.pipeline.data.spec import MultiCropSpec

SPEC = MultiCropSpec.preset("swav", global_size=24, local_size=12, num_local=2)


LOST = {3, 18, 19, 20}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 24 samples in shards of 7, 7, 7, 3
    return make_shard_set(tmp_path_factory.mktemp("data") / "shards", 24, 7)


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = make_shard_set(tmp_path_factory.mktemp("data") / "corrupt", 24, 7)
    spoil_jpeg(directory, 3)  # garbage image bytes
    assert set(truncate_shard(directory, 2, 4)) | {3} == LOST  # shard 2 (14..20) cut inside #4 (18)
    return directory


def collect(loader) -> list[Batch]:  # type: ignore[no-untyped-def]
    return list(loader)


def real_indices(batches: list[Batch]) -> list[int]:
    return [int(i) for b in batches for i in b.index if i >= 0]


def test_two_workers_cover_the_epoch_exactly_once(shards: Path) -> None:
    loader = build_loader(shards, SPEC, 4, backend="torch", num_workers=2, device="cpu", seed=1)
    batches = collect(loader)
    assert len(batches) == len(loader) == 6
    assert sorted(real_indices(batches)) == list(range(24))
    assert loader.stats.samples == 24 and loader.stats.padded == 0 and loader.stats.skipped == 0


def test_two_ranks_get_equal_batch_counts_and_share_the_epoch(shards: Path) -> None:
    per_rank = [
        collect(
            build_loader(shards, SPEC, 5, backend="torch", rank=r, world_size=2, num_workers=2, device="cpu")
        )
        for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 12 samples per rank → 3 batches of 5, padded
    assert all(b.size == 5 for batches in per_rank for b in batches)
    assert sorted(real_indices(per_rank[0]) + real_indices(per_rank[1])) == list(range(24))
    padded = sum(int((b.index < 0).sum()) for batches in per_rank for b in batches)
    assert padded == 2 * 15 - 24


def test_order_and_views_change_between_epochs(shards: Path) -> None:
    first = collect(build_loader(shards, SPEC, 4, backend="torch", num_workers=0, device="cpu", epoch=0))
    second = collect(build_loader(shards, SPEC, 4, backend="torch", num_workers=0, device="cpu", epoch=1))
    assert real_indices(first) != real_indices(second)
    assert sorted(real_indices(first)) == sorted(real_indices(second))
    view_of = {int(i): b.views[0][k] for b in first for k, i in enumerate(b.index)}
    later = {int(i): b.views[0][k] for b in second for k, i in enumerate(b.index)}
    assert not torch.equal(view_of[5], later[5])


def test_views_do_not_depend_on_the_worker_count(shards: Path) -> None:
    def views_by_index(num_workers: int) -> dict[int, list[torch.Tensor]]:
        loader = build_loader(shards, SPEC, 4, backend="torch", num_workers=num_workers, device="cpu", seed=7)
        return {int(i): [v[k] for v in b.views] for b in loader for k, i in enumerate(b.index)}

    one, two = views_by_index(0), views_by_index(2)
    assert one.keys() == two.keys() == set(range(24))
    for index in one:
        for a, b in zip(one[index], two[index], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_the_remaining_batches_identically(shards: Path, num_workers: int) -> None:
    def run(start: int) -> list[Batch]:
        return collect(
            build_loader(
                shards,
                SPEC,
                3,
                backend="torch",
                num_workers=num_workers,
                device="cpu",
                seed=3,
                epoch=2,
                start_batch=start,
            )
        )

    full, resumed = run(0), run(5)
    assert len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
        for va, vb in zip(a.views, b.views, strict=True):
            assert torch.equal(va, vb)


def test_repeats_are_honoured_exactly(shards: Path) -> None:
    repeats = np.array([0, 1, 2] * 8)
    loader = build_loader(shards, SPEC, 4, backend="torch", num_workers=2, device="cpu", repeats=repeats)
    batches = collect(loader)
    counted = Counter(real_indices(batches))
    assert all(counted[i] == repeats[i] for i in range(24))
    assert len(loader) == -(-int(repeats.sum()) // 4)
    twice = int(np.flatnonzero(repeats == 2)[0])
    copies = [b.views[0][k] for b in batches for k, i in enumerate(b.index) if i == twice]
    assert len(copies) == 2 and not torch.equal(copies[0], copies[1])  # different augmentations


def test_corrupt_samples_are_skipped_counted_and_padded(corrupt_shards: Path) -> None:
    loader = build_loader(corrupt_shards, SPEC, 4, backend="torch", num_workers=2, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = collect(loader)
    corrupt_warnings = [w for w in caught if issubclass(w.category, CorruptSampleWarning)]
    assert len(corrupt_warnings) == 1
    assert len(batches) == 6 and all(b.size == 4 for b in batches)  # same count as a clean epoch
    assert sorted(real_indices(batches)) == sorted(set(range(24)) - LOST)
    assert loader.stats.skipped == 4 and loader.stats.padded == 4
    where = " ".join(w for w, _ in loader.stats.skipped_where)
    assert "shard-000000.tar #3 (index 3)" in where and "shard-000002.tar #4 (index 18)" in where
    reasons = dict(loader.stats.skipped_where)
    assert "bad JPEG" in reasons["shard-000000.tar #3 (index 3)"]
    assert "truncated tar" in reasons["shard-000002.tar #4 (index 18)"]


def test_streamed_shards_read_exactly_like_indexed_ones(shards: Path, corrupt_shards: Path) -> None:
    for directory, lost in ((shards, set()), (corrupt_shards, LOST)):
        tars = sorted(directory.glob("*.tar"))
        urls = [f"pipe:cat {tar}" for tar in tars]
        kwargs = dict(backend="torch", num_workers=2, device="cpu", seed=2, shuffle_window=3)
        streamed_loader = build_loader(urls, SPEC, 4, manifest=directory / "manifest.json", **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CorruptSampleWarning)
            indexed = collect(build_loader(directory, SPEC, 4, **kwargs))
            streamed = collect(streamed_loader)
        assert streamed_loader.stats.skipped == len(lost)
        for a, b in zip(indexed, streamed, strict=True):
            assert torch.equal(a.index, b.index)
            for va, vb in zip(a.views, b.views, strict=True):
                assert torch.equal(va, vb)


def test_pixel_ops_on_the_device_equal_those_in_the_workers(shards: Path) -> None:
    kwargs = dict(backend="torch", num_workers=2, device="cpu", seed=4)
    in_workers = collect(build_loader(shards, SPEC, 4, pixel_ops="worker", **kwargs))
    on_device = collect(build_loader(shards, SPEC, 4, pixel_ops="device", **kwargs))
    for a, b in zip(in_workers, on_device, strict=True):
        assert torch.equal(a.index, b.index)
        for va, vb in zip(a.views, b.views, strict=True):
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-4)
