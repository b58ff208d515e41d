"""verify: a clean set passes; each kind of tampering fails with exit 1 and names the shard or sample."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ImageFolder

from clusterssl.shards.convert import ConvertOptions, convert
from clusterssl.shards.format import CLASS_EXT, IMAGE_EXT, INDEX_EXT, encode_int
from clusterssl.shards.manifest import load_manifest
from clusterssl.shards.sources import ImageFolderSource
from clusterssl.shards.tario import file_sha256, read_dali_index, sample_components
from clusterssl.shards.verify import verify
from clusterssl.tools.cli import cli


@pytest.fixture
def shard_set(image_folder: ImageFolder, tmp_path: Path) -> Path:
    """The fixture folder as 4 shards of 4, 4, 4, 3 samples."""
    out = tmp_path / "shards"
    convert(ImageFolderSource(image_folder.root), out, ConvertOptions(samples_per_shard=4))
    return out


def run_verify(directory: Path) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["shards", "verify", str(directory), "--workers", "1", "--json"])
    return result.exit_code, json.loads(result.stdout)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def refresh_checksum(directory: Path, shard: int) -> None:
    """Make the manifest agree with a tampered tar, so only the deeper checks can notice."""
    manifest = load_manifest(directory)
    path = manifest.shard_paths()[shard]
    manifest.shards[shard] = dataclasses.replace(manifest.shards[shard], sha256=file_sha256(path))
    manifest.save(directory)


def component(directory: Path, shard: int, position: int, ext: str):  # type: ignore[no-untyped-def]
    manifest = load_manifest(directory)
    return sample_components(read_dali_index(manifest.index_paths()[shard]), ext)[position]


def test_clean_set_passes(shard_set: Path) -> None:
    code, report = run_verify(shard_set)
    assert code == 0 and report["ok"]
    (only,) = report["sets"]
    assert only["count"] == only["samples_read"] == only["images_decoded"] == 15 and only["problems"] == []


def test_flipped_byte_in_a_jpeg_is_caught(shard_set: Path) -> None:
    jpg = component(shard_set, 1, 2, IMAGE_EXT)
    tar = shard_set / "shard-000001.tar"
    original = tar.read_bytes()[jpg.offset + jpg.size // 2]
    patch(tar, jpg.offset + jpg.size // 2, bytes([original ^ 0xFF]))
    code, report = run_verify(shard_set)
    assert code == 1
    assert report["sets"][0]["bad_shards"] == ["shard-000001.tar"]
    assert "shard-000001.tar: sha256 differs from the manifest" in report["sets"][0]["problems"]


def test_broken_jpeg_names_the_sample(shard_set: Path) -> None:
    jpg = component(shard_set, 2, 1, IMAGE_EXT)
    patch(shard_set / "shard-000002.tar", jpg.offset, b"\0" * 16)  # no JPEG header any more
    refresh_checksum(shard_set, 2)
    code, report = run_verify(shard_set)
    assert code == 1
    (problem,) = report["sets"][0]["problems"]
    assert problem.startswith("shard-000002.tar: sample s000002_000001: image not an image")


def test_truncated_tar_is_caught(shard_set: Path) -> None:
    tar = shard_set / "shard-000003.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    code, report = run_verify(shard_set)
    assert code == 1
    problems = report["sets"][0]["problems"]
    assert report["sets"][0]["bad_shards"] == ["shard-000003.tar"]
    assert any("bytes, the manifest says" in p for p in problems)
    assert any("unreadable tar" in p and "truncated" in p for p in problems)
    assert any("3 sample indices missing: 12, 13, 14" in p for p in problems)


def test_edited_dali_index_is_caught(shard_set: Path) -> None:
    idx = shard_set / "shard-000000.idx"
    lines = idx.read_text().splitlines()
    fields = lines[2].split()
    fields[1] = str(int(fields[1]) + 512)  # the jpg of the 2nd sample now points one block too far
    lines[2] = " ".join(fields)
    idx.write_text("\n".join(lines) + "\n")
    code, report = run_verify(shard_set)
    assert code == 1
    assert report["sets"][0]["problems"] == [
        "shard-000000.tar: sample s000000_000001: DALI index shard-000000.idx does not match the tar "
        "(first difference here)"
    ]


def test_duplicated_index_is_caught_even_with_a_fresh_checksum(shard_set: Path) -> None:
    index = component(shard_set, 1, 0, INDEX_EXT)
    patch(shard_set / "shard-000001.tar", index.offset, encode_int(3))  # sample 4 now claims index 3
    refresh_checksum(shard_set, 1)
    code, report = run_verify(shard_set)
    assert code == 1
    problems = report["sets"][0]["problems"]
    assert "shard-000001.tar: sample s000001_000000: index 3 at position 0; expected 4" in problems
    assert "1 sample indices read twice: 3" in problems
    assert "1 sample indices missing: 4" in problems


def test_label_text_disagreeing_with_label_is_caught(shard_set: Path) -> None:
    cls = component(shard_set, 0, 0, CLASS_EXT)
    tar = shard_set / "shard-000000.tar"
    current = tar.read_bytes()[cls.offset : cls.offset + 1]
    patch(tar, cls.offset, b"2" if current != b"2" else b"1")
    refresh_checksum(shard_set, 0)
    report = verify(shard_set)
    assert not report.ok
    assert [p.sample for p in report.problems] == ["s000000_000000"]
    assert "does not match label" in report.problems[0].message


def test_missing_shard_file_is_caught(shard_set: Path) -> None:
    (shard_set / "shard-000002.tar").unlink()
    code, report = run_verify(shard_set)
    assert code == 1 and report["sets"][0]["bad_shards"] == ["shard-000002.tar"]


def test_verify_checks_train_and_val_and_names_the_bad_one(image_folder: ImageFolder, tmp_path: Path) -> None:
    out = tmp_path / "split"
    convert(ImageFolderSource(image_folder.root), out, ConvertOptions(holdout=0.4))
    assert run_verify(out)[0] == 0
    (out / "val" / "shard-000000.idx").write_text("v1.2 0\n")
    code, report = run_verify(out)
    assert code == 1
    assert [s["ok"] for s in report["sets"]] == [True, False]
    assert report["sets"][1]["directory"].endswith("val")
