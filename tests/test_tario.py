"""The tar writer and DALI index: byte layout identical to what tar readers and DALI's wds2idx expect."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from clusterssl.shards.format import decode_int, encode_int, sample_key
from clusterssl.shards.tario import ShardTarWriter, format_dali_index, parse_dali_index, read_dali_index

SAMPLES = [
    (
        sample_key(0, i),
        [("jpg", bytes([i]) * (37 * i + 1)), ("cls", str(i).encode()), ("index", encode_int(i))],
    )
    for i in range(7)
]


def write(path: Path) -> ShardTarWriter:
    with ShardTarWriter(path) as writer:
        for key, components in SAMPLES:
            writer.add_sample(key, components)
    writer.write_dali_index(path.with_suffix(".idx"))
    return writer


def test_tar_round_trips_through_tarfile_and_webdataset(tmp_path: Path) -> None:
    writer = write(tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == [f"{k}.{ext}" for k, comps in SAMPLES for ext, _ in comps]
        assert archive.extractfile(members[3]).read() == SAMPLES[1][1][0][1]
    read = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [s["__key__"] for s in read] == [k for k, _ in SAMPLES]
    assert [decode_int(s["index"]) for s in read] == list(range(7))
    assert writer.sha256 == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()
    assert writer.bytes_written == (tmp_path / "a.tar").stat().st_size


def test_index_offsets_point_at_the_data(tmp_path: Path) -> None:
    write(tmp_path / "a.tar")
    data = (tmp_path / "a.tar").read_bytes()
    samples = read_dali_index(tmp_path / "a.idx")
    assert len(samples) == len(SAMPLES)
    for (_, components), entries in zip(SAMPLES, samples, strict=True):
        for (ext, payload), entry in zip(components, entries, strict=True):
            assert entry.ext == ext
            assert data[entry.offset : entry.offset + entry.size] == payload


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is needed by wds2idx")
def test_index_matches_dalis_wds2idx(tmp_path: Path) -> None:
    write(tmp_path / "a.tar")
    wds2idx = Path(sys.executable).with_name("wds2idx")
    subprocess.run(
        [str(wds2idx), str(tmp_path / "a.tar"), str(tmp_path / "ref.idx")], check=True, capture_output=True
    )
    assert (tmp_path / "a.idx").read_text() == (tmp_path / "ref.idx").read_text()


def test_index_parser_rejects_bad_headers() -> None:
    good = format_dali_index([[]])
    assert parse_dali_index("v1.2 0\n") == []
    assert good.startswith("v1.2 1")
    for bad in ["", "v1.1 0\n", "v1.2 2\njpg 0 1 a.jpg\n", "v1.2 1\njpg 0 1\n"]:
        with pytest.raises(ValueError):
            parse_dali_index(bad)


def test_keys_with_dots_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dots"), ShardTarWriter(tmp_path / "a.tar") as writer:
        writer.add_sample("a.b", [("jpg", b"x")])
    assert not (tmp_path / "a.tar").exists(), "a failed writer leaves no partial file"


def test_indexed_reads_return_the_payloads_and_detect_truncation(tmp_path: Path) -> None:
    import os

    from clusterssl.shards.tario import TruncatedSample, read_indexed_sample

    write(tmp_path / "a.tar")
    samples = read_dali_index(tmp_path / "a.idx")
    fd = os.open(tmp_path / "a.tar", os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        assert read_indexed_sample(fd, samples[3], size) == dict(SAMPLES[3][1])
        assert read_indexed_sample(fd, samples[3], size, exts=["cls"]) == {"cls": b"3"}
        cut = samples[5][0].offset + 10  # the file ends inside sample 5's image
        with pytest.raises(TruncatedSample, match=r"s000000_000005\.jpg"):
            read_indexed_sample(fd, samples[5], cut)
        assert read_indexed_sample(fd, samples[4], cut)["index"] == encode_int(4)
    finally:
        os.close(fd)


def _mixed_samples() -> list[tuple[str, list[tuple[str, bytes]]]]:
    """Samples of the converter's layout, plus every kind ``add_samples`` must hand to ``add_sample``."""
    rng = random.Random(3)
    samples = []
    for i in range(40):
        image = rng.randbytes(rng.choice([0, 1, 511, 512, 513, 4096, 20_000 + i]))
        source = f"class{i % 3}/img {i}.jpg".encode()
        if i == 17:
            source = b"x" * 600  # a source path longer than one block
        components = [("jpg", image), ("cls", str(i).encode()), ("label", encode_int(i % 3))]
        components += [("index", encode_int(i)), ("src", source)]
        if i == 23:
            components = components[:3]  # a different set of extensions splits the run
        if i == 31:
            components[1] = ("cls", b"")  # an empty small member has no data block
        samples.append((sample_key(0, i), components))
    return samples


def test_add_samples_writes_what_add_sample_writes(tmp_path: Path) -> None:
    samples = _mixed_samples()
    with ShardTarWriter(tmp_path / "one.tar") as one:
        for key, components in samples:
            one.add_sample(key, components)
    with ShardTarWriter(tmp_path / "batch.tar") as batch:
        batch.add_samples(samples[:5])
        batch.add_samples(samples[5:])
    one.write_dali_index(tmp_path / "one.idx")
    batch.write_dali_index(tmp_path / "batch.idx")
    assert (tmp_path / "batch.tar").read_bytes() == (tmp_path / "one.tar").read_bytes()
    assert (tmp_path / "batch.idx").read_text() == (tmp_path / "one.idx").read_text()
    assert (batch.sha256, batch.bytes_written, batch.count) == (one.sha256, one.bytes_written, len(samples))
    with tarfile.open(tmp_path / "batch.tar") as archive:
        assert archive.extractfile(f"{sample_key(0, 17)}.src").read() == b"x" * 600


def test_add_samples_splits_runs_longer_than_one_writev(tmp_path: Path) -> None:
    samples = [(sample_key(1, i), [("jpg", bytes([i % 256]) * 700), ("cls", b"7")]) for i in range(1_100)]
    with ShardTarWriter(tmp_path / "a.tar") as writer:
        writer.add_samples(samples)
    writer.write_dali_index(tmp_path / "a.idx")
    entries = read_dali_index(tmp_path / "a.idx")
    data = (tmp_path / "a.tar").read_bytes()
    assert len(entries) == 1_100
    for (_, components), found in zip(samples, entries, strict=True):
        for (ext, payload), entry in zip(components, found, strict=True):
            assert entry.ext == ext and data[entry.offset : entry.offset + entry.size] == payload


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is needed by wds2idx")
def test_batched_index_matches_dalis_wds2idx(tmp_path: Path) -> None:
    with ShardTarWriter(tmp_path / "a.tar", direct=True) as writer:
        writer.add_samples(_mixed_samples())
    writer.write_dali_index(tmp_path / "a.idx")
    wds2idx = Path(sys.executable).with_name("wds2idx")
    subprocess.run(
        [str(wds2idx), str(tmp_path / "a.tar"), str(tmp_path / "ref.idx")], check=True, capture_output=True
    )
    assert (tmp_path / "a.idx").read_text() == (tmp_path / "ref.idx").read_text()
