"""IDX sources (MNIST's format): every image and label comes back; a bad header is one error line."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import invoke, one_error_line
from idx_helpers import idx_bytes, random_split, write_pair
from PIL import Image

from clusterssl.shards.idx import read_idx
from clusterssl.shards.images import encode_jpeg
from clusterssl.shards.manifest import load_manifest
from clusterssl.shards.reader import iter_samples
from clusterssl.shards.verify import verify

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def stored_rows(directory: Path) -> dict[int, object]:
    """File row → sample, asserting every row is there once."""
    samples = list(iter_samples(directory, decode=True))
    rows = {int(s.src.rsplit("/", 1)[1]): s for s in samples}
    assert len(rows) == len(samples)
    return rows


def assert_round_trip(
    directory: Path, images: np.ndarray, labels: np.ndarray, quality: int, tolerance: int
) -> None:
    rows = stored_rows(directory)
    assert sorted(rows) == list(range(len(images)))
    assert sorted(s.index for s in rows.values()) == list(range(len(images)))
    for row, sample in rows.items():
        assert sample.label == labels[row] and sample.cls == str(labels[row])
        # the stored bytes are exactly the JPEG of the file's pixels, and decode back to them within
        # the quantisation of that quality
        assert sample.jpeg == encode_jpeg(Image.fromarray(images[row]), quality)
        grey = np.asarray(sample.image)[..., 0].astype(int)
        assert grey.shape == images[row].shape
        assert np.abs(grey - images[row]).max() <= tolerance


@pytest.mark.parametrize("gz", [False, True])
def test_directory_becomes_train_and_test(tmp_path: Path, gz: bool) -> None:
    source = tmp_path / "mnist"
    train, test = random_split(0, 37), random_split(1, 11)
    write_pair(source, "train", *train, gz=gz)
    write_pair(source, "t10k", *test, gz=gz)
    result = invoke("shards", "convert", "idx", str(source), str(tmp_path / "out"), "--samples-per-shard",
                    "10", "--workers", "1", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [(s["name"], s["count"]) for s in summary["sets"]] == [(None, 11), (None, 37)]
    for split, (images, labels) in (("train", train), ("test", test)):
        out = tmp_path / "out" / split
        assert verify(out).ok
        manifest = load_manifest(out)
        assert manifest.params["source"]["jpeg_quality"] == 100, "IDX defaults to the highest quality"
        assert manifest.classes == [str(c) for c in range(int(labels.max()) + 1)]
        assert_round_trip(out, images, labels, 100, tolerance=12)  # noise: the worst case


def test_explicit_pair_is_one_set(tmp_path: Path) -> None:
    images, labels = random_split(2, 23)
    path = write_pair(tmp_path / "src", "emnist-letters-train", images, labels, gz=True)
    out = tmp_path / "out"
    result = invoke("shards", "convert", "idx", str(path), str(out), "--jpeg-quality", "90", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert load_manifest(out).count == 23
    assert_round_trip(out, images, labels, 90, tolerance=60)


def test_pixels_survive_at_quality_100(tmp_path: Path) -> None:
    """Smooth strokes like MNIST's come back within one grey level at the default quality."""
    y, x = np.mgrid[0:28, 0:28]
    images = np.stack([np.clip(255 - 12 * np.abs(x - 10 - i) - 3 * np.abs(y - 14), 0, 255) for i in range(8)])
    path = write_pair(
        tmp_path / "src", "train", images.astype(np.uint8), np.arange(8, dtype=np.uint8), gz=False
    )
    assert (
        invoke("shards", "convert", "idx", str(path), str(tmp_path / "out"), "--workers", "1").exit_code == 0
    )
    for row, sample in stored_rows(tmp_path / "out").items():
        assert np.abs(np.asarray(sample.image)[..., 0].astype(int) - images[row]).max() <= 1


def header(magic_dims: int, *shape: int, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, magic_dims]) + b"".join(n.to_bytes(4, "big") for n in shape)


@pytest.mark.parametrize(
    ("images_data", "expected"),
    [
        (header(3, 4, 5, 5) + bytes(99), "says 4 x 5 x 5 = 100 bytes of data, but the file holds only 99"),
        (header(3, 4, 5, 5) + bytes(101), "says 4 x 5 x 5 = 100 bytes of data, but the file holds more"),
        (header(3, 4_000_000_000, 60_000, 60_000), "but the file holds only 0"),
        (b"\x1f\x8b" + bytes(10), "cannot read"),
        (b"PK\x03\x04" + bytes(100), "not an IDX file (bad magic"),
        (header(3, 4, 5, 5, type_code=0x0D) + bytes(400), "is not unsigned bytes in 3 dimension(s)"),
        (header(1, 4) + bytes(4), "is not unsigned bytes in 3 dimension(s)"),
        (bytes([0, 0, 8, 3, 0, 0]), "IDX header cut short"),
        (b"", "not an IDX file (bad magic empty)"),
    ],
)
def test_hostile_image_file_is_one_error_line(tmp_path: Path, images_data: bytes, expected: str) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(images_data)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    result = invoke(
        "shards", "convert", "idx", str(tmp_path / "train-images-idx3-ubyte"), str(tmp_path / "o")
    )
    assert expected in one_error_line(result)


def test_counts_that_disagree_are_one_error_line(tmp_path: Path) -> None:
    path = write_pair(tmp_path, "train", np.zeros((5, 3, 3), np.uint8), np.zeros(4, np.uint8), gz=False)
    line = one_error_line(invoke("shards", "convert", "idx", str(path), str(tmp_path / "o")))
    assert "holds 5 images but" in line and "4 labels" in line


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ({}, "no '*-images-idx3-ubyte[.gz]' files in"),
        ({"train-images-idx3-ubyte": b""}, "has no label file train-labels-idx1-ubyte beside it"),
    ],
)
def test_directory_problems_are_one_error_line(
    tmp_path: Path, layout: dict[str, bytes], expected: str
) -> None:
    for name, data in layout.items():
        (tmp_path / name).write_bytes(data)
    assert expected in one_error_line(invoke("shards", "convert", "idx", str(tmp_path), str(tmp_path / "o")))


def test_read_idx_reads_what_numpy_wrote(tmp_path: Path) -> None:
    array = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "a", 3), array)


@pytest.mark.skipif(
    not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_test_split(tmp_path: Path) -> None:
    """The real files: 10,000 test images of 10 classes, 1,000 each, every label back."""
    images_path = FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
    out = tmp_path / "fashion"
    result = invoke("shards", "convert", "idx", str(images_path), str(out), "--samples-per-shard", "2500")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert manifest.count == 10_000 and manifest.class_counts == [1000] * 10
    assert verify(out, decode=False).ok
    labels = read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz", 1)
    images = read_idx(images_path, 3)
    rows = {int(s.src.rsplit("/", 1)[1]): s for s in iter_samples(out)}
    assert sorted(rows) == list(range(10_000))
    assert all(sample.label == labels[row] for row, sample in rows.items())
    for row in range(0, 10_000, 997):
        decoded = np.asarray(Image.open(io.BytesIO(rows[row].jpeg)), dtype=int)
        assert decoded.shape == (28, 28) and np.abs(decoded - images[row]).max() <= 2
    assert Counter(s.label for s in rows.values()) == Counter(labels.tolist())
