"""Conversion: every input comes back exactly once with its bytes, label and a 0..N-1 index."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import ImageFolder, encode, jpeg_bytes, noise_image
from PIL import Image

from clusterssl.errors import ShardsError
from clusterssl.shards.convert import ConvertOptions, convert
from clusterssl.shards.images import PrepareOptions
from clusterssl.shards.manifest import load_manifest
from clusterssl.shards.plan import shuffled
from clusterssl.shards.reader import iter_samples, iter_tar_members
from clusterssl.shards.sources import DigitsSource, ImageFolderSource, ListSource
from clusterssl.shards.verify import verify


def read_back(directory: Path) -> dict[str, object]:
    """src → sample, asserting that no input appears twice."""
    samples = list(iter_samples(directory))
    by_src = {s.src: s for s in samples}
    assert len(by_src) == len(samples), "an input was written twice"
    return by_src


def test_round_trip_imagefolder(image_folder: ImageFolder, tmp_path: Path) -> None:
    out = tmp_path / "out"
    outcome = convert(ImageFolderSource(image_folder.root), out, ConvertOptions(samples_per_shard=4))
    manifest = load_manifest(out)
    assert manifest.count == len(image_folder.inputs) == 15
    assert manifest.classes == ["bird", "cat", "dog"]
    assert manifest.class_counts == [5, 5, 5]
    assert [s.count for s in manifest.shards] == [4, 4, 4, 3]
    assert [s.index_range for s in manifest.shards] == [(0, 4), (4, 8), (8, 12), (12, 15)]
    assert outcome.sets[0].status == "written" and outcome.sets[0].shards_renumbered == 0

    samples = list(iter_samples(out))
    assert sorted(s.src for s in samples) == sorted(image_folder.inputs)
    assert [s.index for s in samples] == list(range(15)), "indices are 0..N-1 in shard order"
    for sample in samples:
        expected = image_folder.inputs[sample.src]
        assert "." not in sample.key
        assert sample.label == expected.label and sample.cls == str(expected.label)
        if expected.is_jpeg:
            assert sample.jpeg == expected.data, f"{sample.src}: JPEG bytes must be kept as they are"
        else:  # RGBA PNG: re-encoded as an RGB JPEG of the same size, composited on white
            image = Image.open(io.BytesIO(sample.jpeg))
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (24, 20)
            rgba = np.asarray(Image.open(io.BytesIO(expected.data)), dtype=np.float64)
            alpha = rgba[..., 3:] / 255.0
            on_white = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
            decoded = np.asarray(image, dtype=np.float64)
            assert np.abs(decoded - on_white).mean() < 3.0
            assert np.abs(decoded - rgba[..., :3]).mean() > 10.0, "alpha must not simply be dropped"

    # the shards hold the seeded shuffle of the sorted listing, so classes are interleaved
    listing = ImageFolderSource(image_folder.root).list_inputs()
    assert [s.src for s in samples] == [item.ref for item in shuffled(listing.items, seed=0)]
    assert [s.label for s in samples] != sorted(s.label for s in samples)
    assert verify(out).ok


def test_parallel_and_serial_conversions_write_identical_bytes(
    image_folder: ImageFolder, tmp_path: Path
) -> None:
    source = ImageFolderSource(image_folder.root)
    convert(source, tmp_path / "serial", ConvertOptions(samples_per_shard=4, workers=1))
    convert(source, tmp_path / "parallel", ConvertOptions(samples_per_shard=4, workers=2))
    serial, parallel = load_manifest(tmp_path / "serial"), load_manifest(tmp_path / "parallel")
    assert [s.sha256 for s in serial.shards] == [s.sha256 for s in parallel.shards]
    assert serial.content_hash() == parallel.content_hash()
    assert [p.read_text() for p in serial.index_paths()] == [p.read_text() for p in parallel.index_paths()]


def test_seed_changes_the_order_not_the_content(image_folder: ImageFolder, tmp_path: Path) -> None:
    source = ImageFolderSource(image_folder.root)
    convert(source, tmp_path / "a", ConvertOptions(seed=0))
    convert(source, tmp_path / "b", ConvertOptions(seed=1))
    a, b = list(iter_samples(tmp_path / "a")), list(iter_samples(tmp_path / "b"))
    assert [s.src for s in a] != [s.src for s in b]
    assert {s.src: s.jpeg for s in a} == {s.src: s.jpeg for s in b}


def corrupt_inputs(folder: ImageFolder) -> dict[str, str]:
    """Add three bad inputs; returns ref → the reason's expected start."""
    rng = np.random.default_rng(7)
    good = jpeg_bytes(rng, (96, 96))  # large enough that half of it ends inside the image data
    (folder.root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder.root / "dog" / "random.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (folder.root / "bird" / "empty.jpg").write_bytes(b"")
    return {
        "cat/truncated.jpg": "JPEG without an end-of-image marker",
        "dog/random.jpg": "not an image",
        "bird/empty.jpg": "empty file",
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_inputs_are_skipped_listed_and_indices_closed_up(
    image_folder: ImageFolder, tmp_path: Path, workers: int
) -> None:
    bad = corrupt_inputs(image_folder)
    out = tmp_path / "out"
    outcome = convert(
        ImageFolderSource(image_folder.root), out, ConvertOptions(samples_per_shard=3, workers=workers)
    )
    manifest = load_manifest(out)
    assert {s.input: s.reason for s in manifest.skipped}.keys() == bad.keys()
    for skipped in manifest.skipped:
        assert skipped.reason.startswith(bad[skipped.input]), skipped
    assert manifest.count == 15
    assert manifest.params["inputs"] == 18
    assert sum(s.count for s in manifest.shards) == 15
    starts = [s.index_range[0] for s in manifest.shards]
    assert starts == [0, *np.cumsum([s.count for s in manifest.shards])[:-1].tolist()]

    samples = read_back(out)
    assert sorted(samples) == sorted(image_folder.inputs)
    assert sorted(s.index for s in samples.values()) == list(range(15))
    assert [s.index for s in iter_samples(out)] == list(range(15))
    # the fix-up patched exactly the shards at or after the first hole, and their checksums are current
    listing = ImageFolderSource(image_folder.root).list_inputs()
    order = [item.ref for item in shuffled(listing.items, seed=0)]
    first_hole_shard = min(order.index(ref) for ref in bad) // 3
    shards_with_samples = {i // 3 for i, ref in enumerate(order) if ref not in bad}
    expected = len([n for n in shards_with_samples if n >= first_hole_shard])
    assert outcome.sets[0].shards_renumbered == expected > 0
    report = verify(out)
    assert report.ok, report.render()


def test_shard_with_only_bad_inputs_is_left_out(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(4):
        (root / "a" / f"good{i}.jpg").write_bytes(jpeg_bytes(rng))
    for i in range(4):
        (root / "a" / f"bad{i}.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "out"
    convert(ImageFolderSource(root), out, ConvertOptions(samples_per_shard=1))
    manifest = load_manifest(out)
    assert manifest.count == 4 and len(manifest.shards) == 4 and len(manifest.skipped) == 4
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s.file for s in manifest.shards)
    assert verify(out).ok


def test_every_input_bad_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    (root / "x.jpg").write_bytes(b"junk")
    with pytest.raises(ShardsError, match="every input"):
        convert(ImageFolderSource(root.parent), tmp_path / "out", ConvertOptions())


def test_names_with_dots_and_spaces_round_trip(image_folder: ImageFolder, tmp_path: Path) -> None:
    tricky = image_folder.root / "cat" / "IMG.2024.01 copy (2).final.jpeg"
    data = jpeg_bytes(np.random.default_rng(5))
    tricky.write_bytes(data)
    out = tmp_path / "out"
    convert(ImageFolderSource(image_folder.root), out, ConvertOptions(samples_per_shard=5))
    samples = read_back(out)
    assert samples["cat/IMG.2024.01 copy (2).final.jpeg"].jpeg == data
    assert samples["cat/a.b c.jpg"].jpeg == image_folder.inputs["cat/a.b c.jpg"].data
    for path in load_manifest(out).shard_paths():
        for key, ext, _ in iter_tar_members(path):
            assert "." not in key and " " not in key and ext == ext.lower()


def test_holdout_is_stratified_and_each_subset_complete(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    outcome = convert(DigitsSource(), out, ConvertOptions(holdout=0.1, samples_per_shard=500, workers=2))
    assert [s.name for s in outcome.sets] == ["train", "val"]
    train, val = load_manifest(out / "train"), load_manifest(out / "val")
    targets = np.bincount([item.label for item in DigitsSource().list_inputs().items], minlength=10)
    expected_val = np.floor(0.1 * targets + 0.5).astype(int)
    assert val.class_counts == expected_val.tolist()
    assert (np.asarray(train.class_counts) + expected_val).tolist() == targets.tolist()
    train_src = [s.src for s in iter_samples(out / "train")]
    val_src = [s.src for s in iter_samples(out / "val")]
    assert not set(train_src) & set(val_src)
    assert len(train_src) + len(val_src) == 1797 == len(set(train_src) | set(val_src))
    for directory, manifest in ((out / "train", train), (out / "val", val)):
        assert [s.index for s in iter_samples(directory)] == list(range(manifest.count))
        assert Counter(s.label for s in iter_samples(directory)) == dict(enumerate(manifest.class_counts))
        assert verify(directory).ok


def test_holdout_split_depends_on_seed(tmp_path: Path) -> None:
    source = DigitsSource()
    convert(source, tmp_path / "a", ConvertOptions(holdout=0.2, seed=0))
    convert(source, tmp_path / "b", ConvertOptions(holdout=0.2, seed=1))
    a = {s.src for s in iter_samples(tmp_path / "a" / "val")}
    b = {s.src for s in iter_samples(tmp_path / "b" / "val")}
    assert len(a) == len(b) and a != b


def test_list_sources_csv_and_jsonl_with_relative_paths(image_folder: ImageFolder, tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    refs = sorted(image_folder.inputs)
    csv_lines = ["path,label"] + [f"../images/{ref},{ref.split('/')[0]}" for ref in refs[:10]]
    csv_lines.append(f"{image_folder.root / refs[10]},")  # absolute path, no label
    (lists / "data.csv").write_text("\n".join(csv_lines) + "\n")
    convert(ListSource(lists / "data.csv"), tmp_path / "csv", ConvertOptions())
    manifest = load_manifest(tmp_path / "csv")
    assert manifest.classes == ["bird", "cat"]  # only the names that occur
    samples = read_back(tmp_path / "csv")
    assert samples[f"../images/{refs[0]}"].jpeg == image_folder.inputs[refs[0]].data
    assert samples[f"../images/{refs[0]}"].label == manifest.classes.index(refs[0].split("/")[0])
    assert samples[str(image_folder.root / refs[10])].label == -1
    assert manifest.class_counts == [5, 5] and manifest.count == 11

    records = [{"path": f"../images/{ref}", "label": image_folder.inputs[ref].label * 10} for ref in refs[:6]]
    records.append({"path": f"../images/{refs[6]}"})
    (lists / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    convert(ListSource(lists / "data.jsonl"), tmp_path / "jsonl", ConvertOptions())
    manifest = load_manifest(tmp_path / "jsonl")
    assert manifest.classes == [str(i) for i in range(11)]  # integer labels are kept as ids
    samples = read_back(tmp_path / "jsonl")
    for record in records:
        assert samples[record["path"]].label == record.get("label", -1)
        original = image_folder.inputs[record["path"][len("../images/") :]]
        assert (samples[record["path"]].jpeg == original.data) == original.is_jpeg
    assert verify(tmp_path / "jsonl").ok


def test_missing_listed_file_is_skipped_not_fatal(image_folder: ImageFolder, tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("path\nimages/cat/00.jpg\nimages/cat/missing.jpg\n")
    convert(ListSource(tmp_path / "l.csv"), tmp_path / "out", ConvertOptions())
    manifest = load_manifest(tmp_path / "out")
    assert manifest.count == 1 and manifest.classes == []
    assert [(s.input, s.reason.split(":")[0]) for s in manifest.skipped] == [
        ("images/cat/missing.jpg", "cannot read")
    ]


def test_max_side_downscales_large_images_and_keeps_small_jpegs(tmp_path: Path) -> None:
    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(2)
    big, small = jpeg_bytes(rng, (200, 100)), jpeg_bytes(rng, (40, 30))
    (root / "big.jpg").write_bytes(big)
    (root / "small.jpg").write_bytes(small)
    (root / "png.png").write_bytes(encode(noise_image(rng, (50, 80)), "PNG"))
    opts = ConvertOptions(prepare=PrepareOptions(max_side=64))
    convert(ImageFolderSource(root.parent), tmp_path / "out", opts)
    samples = read_back(tmp_path / "out")
    assert Image.open(io.BytesIO(samples["a/big.jpg"].jpeg)).size == (64, 32)
    assert samples["a/small.jpg"].jpeg == small
    assert Image.open(io.BytesIO(samples["a/png.png"].jpeg)).size == (40, 64)


def test_decode_check_catches_what_the_cheap_check_cannot(tmp_path: Path) -> None:
    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    good = jpeg_bytes(np.random.default_rng(4), (64, 64))
    (root / "good.jpg").write_bytes(good)
    # headers intact, SOI and EOI present, but no image data: only a decoder notices
    (root / "hollow.jpg").write_bytes(good[: good.index(b"\xff\xda")] + b"\xff\xd9")
    cheap, decode = tmp_path / "cheap", tmp_path / "decode"
    convert(ImageFolderSource(root.parent), cheap, ConvertOptions())
    convert(ImageFolderSource(root.parent), decode, ConvertOptions(prepare=PrepareOptions(check="decode")))
    assert load_manifest(cheap).count == 2
    assert [s.input for s in load_manifest(decode).skipped] == ["a/hollow.jpg"]
    report = verify(cheap)
    assert not report.ok and report.bad_shards() == ["shard-000000.tar"]
    assert any("does not decode" in str(p) for p in report.problems)


def test_bytes_per_shard_limits_shard_size(image_folder: ImageFolder, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(ImageFolderSource(image_folder.root), out, ConvertOptions(bytes_per_shard=12_000))
    manifest = load_manifest(out)
    assert len(manifest.shards) > 1
    # the planner's estimate is exact for kept JPEGs; re-encoded PNGs may differ a little
    assert all(s.bytes <= 12_000 + 4096 for s in manifest.shards)
    assert manifest.count == 15


def test_rerun_is_a_noop_other_parameters_refused_unless_overwrite(
    image_folder: ImageFolder, tmp_path: Path
) -> None:
    source = ImageFolderSource(image_folder.root)
    out = tmp_path / "out"
    convert(source, out, ConvertOptions(samples_per_shard=4))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = convert(source, out, ConvertOptions(samples_per_shard=4, workers=2))
    assert again.unchanged and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(ShardsError, match=r"different parameters \(samples_per_shard: 4 → 5\)"):
        convert(source, out, ConvertOptions(samples_per_shard=5))
    (image_folder.root / "cat" / "new.jpg").write_bytes(jpeg_bytes(np.random.default_rng(9)))
    with pytest.raises(ShardsError, match="the inputs differ"):
        convert(source, out, ConvertOptions(samples_per_shard=4))
    convert(source, tmp_path / "hold", ConvertOptions(holdout=0.5))
    with pytest.raises(ShardsError, match="train/ and val/"):
        convert(source, tmp_path / "hold", ConvertOptions())
    replaced = convert(source, out, ConvertOptions(samples_per_shard=5, overwrite=True))
    assert replaced.sets[0].status == "written"
    manifest = load_manifest(out)
    assert manifest.count == 16 and [s.count for s in manifest.shards] == [5, 5, 5, 1]
    assert sorted(p.name for p in out.glob("shard-*")) == sorted(
        name for s in manifest.shards for name in (s.file, s.index_file)
    )
    assert verify(out).ok


def test_a_held_lock_is_waited_for_briefly_then_refused(
    image_folder: ImageFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    fcntl = pytest.importorskip("fcntl")  # advisory locks are POSIX

    import clusterssl.shards.convert as convert_module

    out = tmp_path / "out"
    out.mkdir()
    holder = open(out / convert_module.LOCK_NAME, "a")  # noqa: SIM115 - closed below
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    monkeypatch.setattr(convert_module, "LOCK_GRACE_SECONDS", 0.2)
    with pytest.raises(ShardsError, match="another conversion is writing into"):
        convert(ImageFolderSource(image_folder.root), out, ConvertOptions())
    # a lock released within the grace period (a killed conversion whose workers are finishing) is taken
    monkeypatch.setattr(convert_module, "LOCK_GRACE_SECONDS", 10.0)
    threading.Timer(0.3, holder.close).start()
    outcome = convert(ImageFolderSource(image_folder.root), out, ConvertOptions())
    assert outcome.sets[0].manifest.count == len(image_folder.inputs)
