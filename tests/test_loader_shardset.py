"""Resolving ``data`` into shards with counts, reading samples, and the structural JPEG check."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import with_declared_size
from loader_fixtures import make_shard_set, replace_jpeg, spoil_jpeg, truncate_shard
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


def test_decompression_bombs_are_refused_before_decoding(tmp_path: Path) -> None:
    """Shards from elsewhere may hold a few hundred bytes that declare 60000x60000 pixels (10.8 GB to
    decode): the pre-decode check skips them by their declared size, for both backends."""
    bomb = with_declared_size(_jpeg(), 60000, 60000)
    info = inspect_jpeg_bytes(bomb)
    assert not info.ok and "3600.0 MP" in info.reason and "above the limit" in info.reason
    assert inspect_jpeg_bytes(with_declared_size(_jpeg(), 9000, 9000)).ok  # 81 MP: under Pillow's limit
    assert inspect_jpeg(bomb, len(bomb), bomb[-32:], max_pixels=None).ok
    data = make_shard_set(tmp_path / "set", 6, 3)
    replace_jpeg(data, 4, lambda jpeg: with_declared_size(jpeg, 60000, 60000))
    first, second = check_shard_set(resolve_shards(data))
    assert first.status.tolist() == [OK, OK, OK] and second.status.tolist() == [OK, BAD_JPEG, OK]
    assert "decompression bomb" in second.reasons[1]


def test_the_structure_check_refuses_what_decoders_refuse() -> None:
    """A second start-of-image or frame header inside the header is refused (libjpeg stops on both)."""
    good = _jpeg()
    sof = good.index(b"\xff\xc0")
    frame = good[sof : sof + 2 + int.from_bytes(good[sof + 2 : sof + 4], "big")]
    assert "two frame headers" in inspect_jpeg_bytes(good[:sof] + frame + good[sof:]).reason
    assert "second start-of-image" in inspect_jpeg_bytes(good[:2] + good).reason


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


def test_some_shards_are_checked_in_parallel_and_merged_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking only some shards (a rank's share), several at a time, gives the results of the full serial
    check; what two such checks saved is merged, so a later check of every shard reads none."""
    from clusterssl.pipeline.data import integrity

    reference = check_shard_set(resolve_shards(_spoiled_set(tmp_path / "reference")), threads=1)
    shardset = resolve_shards(_spoiled_set(tmp_path / "set"))
    first = check_shard_set(shardset, shards=[3, 1], threads=2)
    second = check_shard_set(shardset, shards=[0, 2], threads=2)
    for check, expected in zip(first + second, [reference[n] for n in (3, 1, 0, 2)], strict=True):
        assert np.array_equal(check.status, expected.status) and check.reasons == expected.reasons
        assert np.array_equal(check.height, expected.height) and np.array_equal(check.width, expected.width)
    assert reference[1].status.tolist() == [OK, BAD_JPEG, OK]

    def unexpected(shard: object) -> None:
        raise AssertionError(f"{shard} was checked again")

    monkeypatch.setattr(integrity, "check_shard", unexpected)
    assert [c.status.tolist() for c in check_shard_set(shardset)] == [c.status.tolist() for c in reference]


def _spoiled_set(directory: Path) -> Path:
    data = make_shard_set(directory, 12, 3)  # shards of 3
    spoil_jpeg(data, 4)  # shard 1, position 1
    return data


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


def test_a_manifest_that_disagrees_with_its_shards_is_refused(tmp_path: Path) -> None:
    """A total that is not the sum of the shards (or index ranges that do not tile 0..N-1) would make
    every epoch length and feature-bank row count wrong without a word."""
    data = make_shard_set(tmp_path / "set", 6, 3)
    path = data / "manifest.json"
    original = json.loads(path.read_text())
    path.write_text(json.dumps({**original, "count": 7}))
    with pytest.raises(PipelineError, match="says 7 samples but its shards hold 6"):
        resolve_shards(data)
    with pytest.raises(PipelineError, match="says 7 samples"):
        resolve_shards([str(data / "shard-000000.tar")])
    shifted = json.loads(json.dumps(original))
    shifted["shards"][1]["index_range"] = [2, 5]
    path.write_text(json.dumps(shifted))
    with pytest.raises(PipelineError, match=r"index range \[2, 5\] instead of \[3, 6\]"):
        resolve_shards(data)


def test_unreadable_sample_reasons_are_one_line() -> None:
    """Decoders append dozens of C++ frames to their messages; a skipped sample's reason keeps the message."""
    frames = "".join(f"[frame {i}]: /usr/lib/libdali.so(+0x{i:x}) [0x{i:x}]\n" for i in range(40))
    error = SampleUnavailable(
        "shard-000000.tar #3",
        f"bad JPEG (Error in thread 0:\nnvjpeg error 6\nStacktrace (40 entries):\n{frames})",
    )
    assert error.reason == "bad JPEG (Error in thread 0: nvjpeg error 6" and "\n" not in str(error)
    torch_style = (
        "bad JPEG (Not a JPEG file\nException raised from decode_jpeg at decode.cpp:97\nframe #0: c10::Error)"
    )
    assert SampleUnavailable("s #1", torch_style).reason == "bad JPEG (Not a JPEG file"
    assert len(SampleUnavailable("s #1", "x" * 1000).reason) == 300
