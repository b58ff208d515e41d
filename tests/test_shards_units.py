"""The pieces of a conversion, against hand-worked values: planning, hold-out, sources, image checks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import ImageFolder, encode, jpeg_bytes, noise_image, smooth_image
from PIL import Image

from clusterssl.errors import ShardsError
from clusterssl.shards import sources
from clusterssl.shards.convert import ConvertOptions, convert
from clusterssl.shards.images import BadInput, PrepareOptions, prepare_jpeg
from clusterssl.shards.jpeg import ends_properly, walk_header
from clusterssl.shards.manifest import load_manifest
from clusterssl.shards.plan import (
    LISTING_HASH_BLOCK,
    ShardPlan,
    estimated_sample_bytes,
    listing_hash,
    plan_shards,
    shuffled,
    stratified_holdout,
)
from clusterssl.shards.sources import DigitsSource, ImageFolderSource, InputItem, ListSource, read_file


def items(sizes: list[int], labels: list[int] | None = None) -> list[InputItem]:
    labels = labels or [0] * len(sizes)
    return [InputItem(f"{i}", label, size) for i, (size, label) in enumerate(zip(sizes, labels, strict=True))]


def test_sample_bytes_estimate_by_hand() -> None:
    # jpg: 512 header + 1000 rounded up to 1024; cls/label/index: 512 + 512 each; src "0": 512 + 512
    assert estimated_sample_bytes(InputItem("0", 3, 1000)) == 1536 + 3 * 1024 + 1024 == 5632
    assert estimated_sample_bytes(InputItem("0", 3, 1024)) == 5632
    assert estimated_sample_bytes(InputItem("0", 3, 1025)) == 6144


def test_plan_by_samples_and_bytes() -> None:
    assert plan_shards(items([1] * 7), 3, None) == [
        ShardPlan(0, 0, 3),
        ShardPlan(1, 3, 6),
        ShardPlan(2, 6, 7),
    ]
    # every sample is 5632 bytes: two fit in 12000, a third would not
    assert plan_shards(items([1000] * 5), None, 12_000) == [
        ShardPlan(0, 0, 2),
        ShardPlan(1, 2, 4),
        ShardPlan(2, 4, 5),
    ]
    assert [p.stop - p.start for p in plan_shards(items([1000] * 5), 1, 12_000)] == [1] * 5
    # an input larger than the limit still gets a shard (of its own)
    assert plan_shards(items([100, 50_000, 100]), None, 12_000) == [
        ShardPlan(0, 0, 1),
        ShardPlan(1, 1, 2),
        ShardPlan(2, 2, 3),
    ]
    assert plan_shards([], 3, None) == []


@pytest.mark.parametrize("count", [0, 1, 7, 999, 1000, 1001, 2500])
@pytest.mark.parametrize("per_shard", [1, 3, 1000])
def test_plan_by_samples_alone_equals_the_general_cut(count: int, per_shard: int) -> None:
    """The count-only shortcut cuts where the general loop does with a byte limit that never binds."""
    listing = items([100 + i % 7 for i in range(count)])
    assert plan_shards(listing, per_shard, None) == plan_shards(listing, per_shard, 1 << 60)


def test_estimate_is_exact_for_kept_jpegs(image_folder: ImageFolder, tmp_path: Path) -> None:
    for ref, image in list(image_folder.inputs.items()):
        if not image.is_jpeg:
            (image_folder.root / ref).unlink()
    convert(ImageFolderSource(image_folder.root), tmp_path / "out", ConvertOptions(samples_per_shard=100))
    (shard,) = load_manifest(tmp_path / "out").shards
    listing = ImageFolderSource(image_folder.root).list_inputs()
    assert shard.bytes == sum(estimated_sample_bytes(i) for i in listing.items) + 1024  # + end-of-archive


def test_stratified_holdout_by_hand() -> None:
    data = items([1] * 11, labels=[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, -1])
    train, val = stratified_holdout(data, 0.25, seed=0)
    # round(0.25 × 4) = 1, round(0.25 × 6) = round(1.5) = 2, round(0.25 × 1) = 0
    assert sorted(i.label for i in val) == [0, 1, 1]
    assert sorted(i.ref for i in train + val) == sorted(i.ref for i in data)
    assert [i.ref for i in train] == sorted((i.ref for i in train), key=int), "listing order kept"
    again_train, again_val = stratified_holdout(data, 0.25, seed=0)
    assert again_val == val and again_train == train
    assert any(stratified_holdout(data, 0.25, seed=s)[1] != val for s in range(1, 10))


def test_shuffle_is_a_seeded_permutation() -> None:
    data = items([1] * 50)
    a, b, c = shuffled(data, 0), shuffled(data, 0), shuffled(data, 1)
    assert a == b and a != c and sorted(a, key=lambda i: int(i.ref)) == data
    assert shuffled(data, 0, "val") != a, "subsets use their own stream"


def test_imagefolder_listing_rules(tmp_path: Path) -> None:
    root = tmp_path / "r"
    data = jpeg_bytes(np.random.default_rng(0))
    for path in ["b/1.JPEG", "b/deep/2.png", "a/x.jpg", ".hidden/3.jpg", "b/.cache/4.jpg"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    (root / "a" / "readme.txt").write_text("no")
    listing = ImageFolderSource(root).list_inputs()
    assert listing.classes == ["a", "b"]
    assert [(i.ref, i.label, i.size) for i in listing.items] == [
        ("a/x.jpg", 0, len(data)),
        ("b/1.JPEG", 1, len(data)),
        ("b/deep/2.png", 1, len(data)),
    ]
    (root / "stray.jpg").write_bytes(data)
    with pytest.raises(ShardsError, match=r"1 image\(s\) lie directly in"):
        ImageFolderSource(root).list_inputs()


def test_list_label_rules(tmp_path: Path) -> None:
    def listing(name: str, text: str):  # type: ignore[no-untyped-def]
        (tmp_path / name).write_text(text)
        return ListSource(tmp_path / name).list_inputs()

    numeric = listing("n.csv", "path,label\nb.jpg,2\na.jpg,0\nc.jpg,-1\nd.jpg,\n")
    assert [(i.ref, i.label) for i in numeric.items] == [
        ("a.jpg", 0),
        ("b.jpg", 2),
        ("c.jpg", -1),
        ("d.jpg", -1),
    ]
    assert numeric.classes == ["0", "1", "2"]
    named = listing("s.jsonl", '{"path": "x.jpg", "label": "zebra"}\n{"path": "y.jpg", "label": "ant"}\n')
    assert named.classes == ["ant", "zebra"] and [i.label for i in named.items] == [1, 0]
    with pytest.raises(ShardsError, match="mix integers and names"):
        listing("mixed.jsonl", '{"path": "x.jpg", "label": "zebra"}\n{"path": "y.jpg", "label": 3}\n')
    with pytest.raises(ShardsError, match="must be >= 0"):
        listing("neg.csv", "path,label\na.jpg,-2\n")
    with pytest.raises(ShardsError, match="integers or strings"):
        listing("bool.jsonl", '{"path": "a.jpg", "label": true}\n')
    with pytest.raises(ShardsError, match="line 2: not JSON"):
        listing("broken.jsonl", '{"path": "a.jpg"}\n{"path": \n')
    with pytest.raises(ShardsError, match=r"must end in \.csv or \.jsonl"):
        listing("l.txt", "a.jpg\n")


def test_digits_source_renders_labelled_jpegs_and_pickles() -> None:
    source = DigitsSource(image_size=40)
    listing = source.list_inputs()
    assert len(listing.items) == 1797 and listing.classes == [str(d) for d in range(10)]
    assert np.bincount([i.label for i in listing.items]).tolist() == [
        178,
        182,
        177,
        183,
        181,
        182,
        181,
        179,
        174,
        180,
    ]
    data = source.read("digits/0000")
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (40, 40)
    # row 0 is a "0": ink (bright) on the ring, background (dark) in the corners and the centre
    pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels[:5, :5].mean() < 30 and pixels[18:22, 18:22].mean() < 60 and pixels.max() > 200
    assert pickle.loads(pickle.dumps(source)).read("digits/0000") == data
    with pytest.raises(ShardsError):
        DigitsSource(image_size=4)


def test_jpeg_end_marker_rules() -> None:
    data = jpeg_bytes(np.random.default_rng(1), (64, 64))
    assert ends_properly(data) and ends_properly(data + b"\0\0\n")
    assert not ends_properly(data[:-1]) and not ends_properly(data + b"junk")


def test_prepare_keeps_rgb_and_grey_jpegs_and_reencodes_the_rest() -> None:
    rng = np.random.default_rng(2)
    options = PrepareOptions()
    rgb = jpeg_bytes(rng)
    grey = encode(noise_image(rng).convert("L"), "JPEG")
    assert prepare_jpeg(rgb, options) == rgb and prepare_jpeg(grey, options) == grey
    cmyk = encode(smooth_image(rng, (32, 16)).convert("CMYK"), "JPEG")
    converted = Image.open(io.BytesIO(prepare_jpeg(cmyk, options)))
    assert converted.format == "JPEG" and converted.mode == "RGB" and converted.size == (32, 16)
    deep = Image.fromarray((np.arange(16 * 8, dtype=np.uint16).reshape(8, 16) * 500).astype(np.uint16))
    stretched = np.asarray(Image.open(io.BytesIO(prepare_jpeg(encode(deep, "PNG"), options))).convert("L"))
    assert stretched.min() <= 3 and stretched.max() >= 252, "16-bit input uses the full 8-bit range"
    for bad, reason in [
        (b"", "empty file"),
        (b"GIF89a" + b"\0" * 10, "not an image"),
        (rgb[:-2], "end-of-image"),
    ]:
        with pytest.raises(BadInput, match=reason):
            prepare_jpeg(bad, options)


def test_manifest_json_has_the_documented_fields(image_folder: ImageFolder, tmp_path: Path) -> None:
    convert(ImageFolderSource(image_folder.root), tmp_path / "out", ConvertOptions(samples_per_shard=8))
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(data) == {
        *("format_version", "count", "classes", "class_counts", "shards", "skipped", "params"),
        *("notes", "large_images"),
    }
    assert set(data["shards"][0]) == {"file", "index_file", "count", "bytes", "sha256", "index_range"}
    assert data["params"]["source"]["kind"] == "imagefolder" and data["params"]["seed"] == 0
    assert data["params"]["samples_per_shard"] == 8 and data["params"]["check"] == "cheap"


def test_jpeg_frame_agrees_with_pil() -> None:
    """The fast header walk decides "keep as is" exactly where PIL would find a 1- or 3-band JPEG."""

    def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
        header = walk_header(data)
        return (header.width, header.height, header.components) if header.kept_as_is else None

    rng = np.random.default_rng(3)
    rgb = smooth_image(rng, (61, 37))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated; the bytes are kept as they are either way
    cases = {
        "baseline": encode(rgb, "JPEG", quality=80),
        "progressive": encode(rgb, "JPEG", progressive=True),
        "optimized 4:4:4": encode(rgb, "JPEG", optimize=True, subsampling=0),
        "grey": encode(rgb.convert("L"), "JPEG"),
        "with exif": encode(rgb, "JPEG", exif=exif.tobytes()),
    }
    for name, data in cases.items():
        image = Image.open(io.BytesIO(data))
        assert jpeg_frame(data) == (*image.size, len(image.getbands())), name
    cmyk = encode(rgb.convert("CMYK"), "JPEG")
    baseline = cases["baseline"]
    sof = baseline.index(b"\xff\xc0")
    for name, data in {
        "cmyk": cmyk,
        "png": encode(rgb, "PNG"),
        "cut inside the header": baseline[: sof + 6],
        "broken segment chain": baseline[:sof] + b"\x00" + baseline[sof + 1 :],
        "no frame before the scan": baseline[:sof]
        + baseline[sof + 2 + int.from_bytes(baseline[sof + 2 : sof + 4], "big") :],
        "random": rng.integers(0, 256, 500, dtype=np.uint8).tobytes(),
    }.items():
        assert jpeg_frame(data) is None, name


@pytest.mark.parametrize("piece", [1, 1000, 4096])
@pytest.mark.parametrize("size", [0, 1, 5000, 70_000])
def test_read_file_reads_to_the_end_through_short_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int, size: int
) -> None:
    """A file system that returns at most ``piece`` bytes per read (FUSE, network mounts) still gives the
    whole file, as does one whose size grew after ``fstat`` (here: fstat says 0)."""
    data = np.random.default_rng(size).bytes(size)
    (tmp_path / "f").write_bytes(data)
    assert read_file(tmp_path / "f") == data
    real_read = sources.os.read
    monkeypatch.setattr(sources.os, "read", lambda fd, n: real_read(fd, min(n, piece)))
    assert read_file(tmp_path / "f") == data
    monkeypatch.undo()
    monkeypatch.setattr(sources.os, "fstat", lambda fd: os.stat_result((0,) * 10))
    assert read_file(tmp_path / "f") == data


@pytest.mark.parametrize(
    "count", [0, 1, LISTING_HASH_BLOCK, LISTING_HASH_BLOCK + 1, 2 * LISTING_HASH_BLOCK + 7]
)
def test_listing_hash_is_the_sha256_of_the_listing_as_text(count: int) -> None:
    """Hashed a block at a time, the same as the whole text: class lines, then ref, label, size per input."""
    listing = [InputItem(f"c{i % 3}/ü {i}.jpg", i % 3, 1000 + i) for i in range(count)]
    text = "class\ta\nclass\tb\nclass\tc\n" + "".join(
        f"c{i % 3}/ü {i}.jpg\t{i % 3}\t{1000 + i}\n" for i in range(count)
    )
    assert listing_hash(listing, ["a", "b", "c"]) == hashlib.sha256(text.encode()).hexdigest()
