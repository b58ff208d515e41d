"""Parquet sources (Hugging Face's layout): every image and label back, bad rows skipped, memory bounded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_helpers import invoke, one_error_line
from conftest import jpeg_bytes

from clusterssl.shards.manifest import load_manifest
from clusterssl.shards.parquet import ParquetSource, huggingface_class_names
from clusterssl.shards.reader import iter_samples
from clusterssl.shards.verify import verify

NAMES = ["T-shirt", "Trouser", "Pullover"]
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def hf_metadata(names: list[str]) -> dict[bytes, bytes]:
    """The schema metadata ``datasets`` writes: its features, with the label as a ClassLabel."""
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def write_table(path: Path, images: list[object], labels: list[object], struct: bool, row_group: int) -> None:
    image_type = IMAGE_STRUCT if struct else pa.binary()
    schema = pa.schema([("image", image_type), ("label", pa.int64())], metadata=hf_metadata(NAMES))
    table = pa.table({"image": pa.array(images, image_type), "label": pa.array(labels, pa.int64())}, schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group)


def by_src(directory: Path) -> dict[str, object]:
    samples = list(iter_samples(directory))
    found = {s.src: s for s in samples}
    assert len(found) == len(samples)
    assert sorted(s.index for s in samples) == list(range(len(samples)))
    return found


@pytest.mark.parametrize("struct", [True, False])
def test_round_trip_several_files(tmp_path: Path, struct: bool) -> None:
    rng = np.random.default_rng(0)
    expected: dict[str, tuple[bytes, int]] = {}
    for name, count in (("train-00000-of-00002.parquet", 13), ("sub/train-00001-of-00002.parquet", 8)):
        images = [jpeg_bytes(rng) for _ in range(count)]
        labels = [int(x) for x in rng.integers(0, 3, count)]
        cells = [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)] if struct else images
        write_table(tmp_path / "data" / name, cells, labels, struct, row_group=5)
        width = len(str(count - 1))
        expected.update({f"{name}/{i:0{width}d}": (images[i], labels[i]) for i in range(count)})
    out = tmp_path / "out"
    result = invoke("shards", "convert", "parquet", str(tmp_path / "data"), str(out), "--samples-per-shard",
                    "6", "--workers", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert manifest.classes == NAMES and manifest.count == 21 and not manifest.skipped
    assert verify(out).ok
    samples = by_src(out)
    assert sorted(samples) == sorted(expected)
    for ref, sample in samples.items():
        image, label = expected[ref]
        assert sample.jpeg == image and sample.label == label, ref  # JPEG bytes kept as they are


def test_bad_rows_are_counted_skips(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    good = [jpeg_bytes(rng) for _ in range(4)]
    cells = [
        {"bytes": good[0], "path": None},
        {"bytes": None, "path": "elsewhere/1.png"},
        None,
        {"bytes": b"not an image", "path": None},
        {"bytes": good[1], "path": None},
        {"bytes": good[2], "path": None},
        {"bytes": good[3], "path": None},
    ]
    labels = [0, 1, 2, 1, 7, -3, None]
    write_table(tmp_path / "t.parquet", cells, labels, struct=True, row_group=3)
    out = tmp_path / "out"
    assert (
        invoke(
            "shards", "convert", "parquet", str(tmp_path / "t.parquet"), str(out), "--workers", "1"
        ).exit_code
        == 0
    )
    manifest = load_manifest(out)
    reasons = {s.input: s.reason for s in manifest.skipped}
    assert reasons["t.parquet/1"] == "no image bytes in column 'image' (only the path 'elsewhere/1.png')"
    assert reasons["t.parquet/2"] == "no image in column 'image' (null)"
    assert reasons["t.parquet/3"].startswith("not an image")
    assert reasons["t.parquet/4"] == "label 7 is out of range (the metadata names 3 classes)"
    assert reasons["t.parquet/5"] == "label -3 is out of range (the metadata names 3 classes)"
    assert len(reasons) == 5
    samples = by_src(out)
    assert {ref: (s.jpeg, s.label) for ref, s in samples.items()} == {
        "t.parquet/0": (good[0], 0),
        "t.parquet/6": (good[3], -1),  # a null label is an unlabelled sample
    }


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            ["--image-column", "img"],
            "has no column 'img' (columns: image, label); name it with --image-column",
        ),
        (["--label-column", "image"], "label column 'image' is struct"),
        (["--image-column", "label"], "column 'label' is int64; expected binary or a struct"),
    ],
)
def test_column_problems_are_one_error_line(tmp_path: Path, options: list[str], expected: str) -> None:
    write_table(tmp_path / "t.parquet", [{"bytes": b"x", "path": None}], [0], struct=True, row_group=1)
    result = invoke(
        "shards", "convert", "parquet", str(tmp_path / "t.parquet"), str(tmp_path / "o"), *options
    )
    assert expected in one_error_line(result)


def test_not_parquet_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "t.parquet").write_bytes(b"PAR1 but not really")
    line = one_error_line(
        invoke("shards", "convert", "parquet", str(tmp_path / "t.parquet"), str(tmp_path / "o"))
    )
    assert line.startswith("Error: cannot read") and "as Parquet" in line


def test_class_names_only_from_a_class_label() -> None:
    assert huggingface_class_names(hf_metadata(["a", "b"])[b"huggingface"], "label") == ["a", "b"]
    assert huggingface_class_names(hf_metadata(["a", "b"])[b"huggingface"], "other") is None
    assert huggingface_class_names(b"{not json", "label") is None
    assert huggingface_class_names(None, "label") is None


PEAK_SCRIPT = """
import sys, tracemalloc
import pyarrow as pa
import pyarrow.parquet as pq
from clusterssl.shards.parquet import ParquetSource

# one tiny read first, so that the modules imported on first use are not counted as reading
warm_up = ParquetSource([sys.argv[3]])
warm_up.reader_for([item.ref for item in warm_up.list_inputs().items])
tracemalloc.start()  # after the imports: only what reading allocates
if sys.argv[2] == "whole":
    table = pq.read_table(sys.argv[1])
else:
    source = ParquetSource([sys.argv[1]])
    refs = [item.ref for item in source.list_inputs().items]
    spread = len(refs) // 32
    for shard in range(4):  # 4 shards of 32 rows, each spread over every row group
        mine = refs[shard::spread][:32]
        rows = source.reader_for(mine)
        for ref in mine:
            rows.read(ref)
        del rows
# Arrow's buffers (its memory pool) plus Python's objects: an upper bound of the peak in use at once
print(pa.default_memory_pool().max_memory() + tracemalloc.get_traced_memory()[1])
"""


def peak_use(path: Path, mode: str) -> int:
    tiny = path.with_name("tiny.parquet")
    write_groups(tiny, groups=1, group_rows=1, row_bytes=1)
    command = [sys.executable, "-c", PEAK_SCRIPT, str(path), mode, str(tiny)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def write_groups(path: Path, groups: int, group_rows: int, row_bytes: int) -> None:
    """A Parquet file of incompressible rows in ``groups`` row groups of ``group_rows`` rows."""
    rng = np.random.default_rng(2)
    schema = pa.schema([("image", pa.binary()), ("label", pa.int64())])
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for _ in range(groups):
            images = [rng.bytes(row_bytes) for _ in range(group_rows)]
            writer.write_table(pa.table({"image": images, "label": [1] * group_rows}, schema))


def test_memory_stays_near_one_row_group(tmp_path: Path) -> None:
    """Listing a file and reading shards spread over every row group takes a shard's images and a few
    row groups of buffers, the same for a file 4x larger; reading it whole (the control) takes the file."""
    group_rows, row_bytes = 32, 64 << 10
    group_bytes = group_rows * row_bytes
    uses = {}
    for groups in (8, 32):
        path = tmp_path / f"{groups}.parquet"
        write_groups(path, groups, group_rows, row_bytes)
        uses[groups] = peak_use(path, "read")
    whole = peak_use(tmp_path / "32.parquet", "whole")
    print(
        f"peak in use: {uses[8] / 2**20:.1f} MiB (8 row groups), {uses[32] / 2**20:.1f} MiB (32 row groups), "
        f"{whole / 2**20:.1f} MiB reading the 32 whole; a row group is {group_bytes / 2**20:.0f} MiB"
    )
    assert whole > 30 * group_bytes, "the control must see the whole file"
    shard_bytes = 32 * row_bytes
    assert uses[32] < shard_bytes + 4 * group_bytes
    assert uses[32] < uses[8] + group_bytes, "memory must not grow with the file"


def test_source_pickles_without_open_files(tmp_path: Path) -> None:
    import pickle

    rng = np.random.default_rng(3)
    write_table(tmp_path / "t.parquet", [jpeg_bytes(rng)], [2], struct=False, row_group=1)
    source = ParquetSource([tmp_path / "t.parquet"])
    assert source.list_inputs().items[0].label == 2
    copy = pickle.loads(pickle.dumps(source))
    assert copy.read("t.parquet/0") == source.read("t.parquet/0")
