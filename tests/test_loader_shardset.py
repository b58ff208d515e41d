"""Resolving ``data`` into shards with counts, reading samples, and the structural JPEG check."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_fixtures import make_shard_set, spoil_jpeg, truncate_shard
from PIL import Image

from clusterssl.errors import PipelineError
from clusterssl.pipeline.data.integrity import (
    BAD_JPEG,
    OK,
    SIDECAR_NAME,
    TRUNCATED,
    check_shard_set,
    inspect_jpeg,
    inspect_jpeg_bytes,
)
from clusterssl.pipeline.data.shardset import (
    IndexedShardReader,
    SampleUnavailable,
    StreamShardReader,
    resolve_shards,
)
from clusterssl.shards.format import INDEX_EXT, decode_int


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shard_set(tmp_path_factory.mktemp("data") / "shards", 15, 6)  # shards of 6, 6, 3


def test_every_form_of_data_resolves_to_the_same_shards(shards: Path) -> None:
    by_dir = resolve_shards(shards)
    assert by_dir.counts == [6, 6, 3] and by_dir.total == by_dir.num_indices == 15 and by_dir.indexed
    assert [s.first_index for s in by_dir.shards] == [0, 6, 12]
    assert by_dir.classes == ["class0", "class1", "class2"]
    for data in (
        shards / "manifest.json",
        [str(p) for p in sorted(shards.glob("*.tar"))],
        str(shards / "shard-{000000..000002}.tar"),
    ):
        assert [s.local_path for s in resolve_shards(data).shards] == [s.local_path for s in by_dir.shards]
    subset = resolve_shards([shards / "shard-000001.tar"])
    assert subset.counts == [6] and subset.shards[0].first_index == 6 and subset.num_indices == 15
    piped = resolve_shards([f"pipe:cat {shards}/shard-000002.tar"], manifest=shards)
    assert piped.counts == [3] and not piped.indexed and piped.shards[0].url.startswith("pipe:")


def test_unresolvable_data_fails_with_one_clear_line(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no shard set at"):
        resolve_shards(tmp_path / "nowhere")
    with pytest.raises(PipelineError, match="cannot tell how many samples"):
        resolve_shards(["pipe:cat x/shard-000000.tar"])
    lonely = tmp_path / "shard-000000.tar"
    lonely.write_bytes((shards / "shard-000000.tar").read_bytes())
    with pytest.raises(PipelineError, match=r"no manifest\.json"):
        resolve_shards([lonely])
    with pytest.raises(PipelineError, match="not listed in the manifest"):
        resolve_shards(["pipe:cat other-000009.tar"], manifest=shards)


def test_backend_choice_fails_early_and_clearly(shards: Path) -> None:
    from clusterssl.pipeline.data.loader import build_loader

    piped = [f"pipe:cat {shards}/shard-000000.tar"]
    assert build_loader(piped, "eval", 2, manifest=shards, device="cpu").backend == "torch"  # auto
    assert build_loader(shards, "eval", 2, device="cpu").backend == "torch"  # auto without a GPU
    with pytest.raises(PipelineError, match="need backend='torch'"):
        build_loader(piped, "eval", 2, manifest=shards, backend="dali", device="cpu")
    with pytest.raises(PipelineError, match="unknown loader backend 'jax'; known: auto, dali, torch"):
        build_loader(shards, "eval", 2, backend="jax", device="cpu")
    with pytest.raises(PipelineError, match="start_batch 9 is outside"):
        build_loader(shards, "eval", 2, device="cpu", start_batch=9)


def test_indexed_and_streamed_readers_return_the_same_samples(shards: Path) -> None:
    shard = resolve_shards(shards).shards[1]
    indexed = IndexedShardReader(shard)
    streamed = StreamShardReader(shard)
    order = [3, 1, 1, 5, 0, 4, 2]
    streamed.want(order)
    for position in order:
        a, b = indexed.read(position), streamed.read(position)
        assert a == {ext: b[ext] for ext in a} and decode_int(a[INDEX_EXT]) == 6 + position
    assert not streamed._kept  # nothing held once every wanted sample was served


def test_truncated_shards_are_reported_per_sample(tmp_path: Path) -> None:
    data = make_shard_set(tmp_path / "cut", 6, 6)
    truncate_shard(data, 0, 3)
    shard = resolve_shards(data).shards[0]
    indexed, streamed = IndexedShardReader(shard), StreamShardReader(shard)
    for reader in (indexed, streamed):
        assert decode_int(reader.read(2)[INDEX_EXT]) == 2
        with pytest.raises(SampleUnavailable, match="truncated"):
            reader.read(3)


def _jpeg(**save: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def test_jpeg_structure_check() -> None:
    good = _jpeg()
    info = inspect_jpeg_bytes(good)
    assert info.ok and (info.height, info.width) == (20, 30)
    assert inspect_jpeg_bytes(_jpeg(progressive=True)).ok
    assert not inspect_jpeg_bytes(good[: len(good) // 2]).ok  # cut short: no end marker
    assert not inspect_jpeg_bytes(b"").ok and not inspect_jpeg_bytes(b"\x89PNG....").ok
    assert not inspect_jpeg_bytes(good[:40]).ok  # cut inside the header
    # A big APP segment: the first bytes alone cannot tell, the check asks for more.
    big = _jpeg(icc_profile=bytes(150000))
    partial = inspect_jpeg(big[:1000], len(big), big[-32:])
    assert not partial.ok and partial.header_end > 1000
    assert inspect_jpeg_bytes(big).ok


def test_shard_check_is_cached_and_invalidated(tmp_path: Path) -> None:
    data = make_shard_set(tmp_path / "set", 9, 5)  # shards of 5 and 4
    spoil_jpeg(data, 2)
    truncate_shard(data, 1, 2)
    shardset = resolve_shards(data)
    first, second = check_shard_set(shardset)
    assert first.status.tolist() == [OK, OK, BAD_JPEG, OK, OK]
    assert second.status.tolist() == [OK, OK, TRUNCATED, TRUNCATED]
    assert (first.height[[0, 1, 3, 4]] >= 24).all() and first.height[2] == 0
    sidecar = data / SIDECAR_NAME
    assert sidecar.is_file()
    stamp = sidecar.stat().st_mtime_ns
    again = check_shard_set(shardset)
    assert sidecar.stat().st_mtime_ns == stamp  # served from the cache
    assert again[0].reasons == first.reasons and np.array_equal(again[1].status, second.status)
    # Rewrite shard 0 with good images: its check is redone, the other shard's reused.
    replacement = make_shard_set(tmp_path / "fresh", 5, 5, seed=3)
    os.replace(replacement / "shard-000000.tar", data / "shard-000000.tar")
    os.replace(replacement / "shard-000000.idx", data / "shard-000000.idx")
    assert check_shard_set(shardset)[0].status.tolist() == [OK] * 5


def test_both_decoders_give_the_same_pixels() -> None:
    from clusterssl.pipeline.data.torch_backend import _decode_with_pil, decode_jpeg

    for data in (_jpeg(), _jpeg(progressive=True)):
        assert torch.equal(decode_jpeg(data), _decode_with_pil(data))  # the PIL fallback, same libjpeg
    gray = io.BytesIO()
    Image.new("L", (9, 7), 90).save(gray, "JPEG")
    assert decode_jpeg(gray.getvalue()).shape == (3, 7, 9)
    for decode in (decode_jpeg, _decode_with_pil):
        with pytest.raises(ValueError):
            decode(b"\xff\xd8 not really a JPEG")
