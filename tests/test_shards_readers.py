"""Other readers see what we wrote: DALI's webdataset reader (CPU, our index files), webdataset, and our
random-access reader by global index."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import ImageFolder, jpeg_bytes
from PIL import Image
from test_shards_convert import corrupt_inputs

from clusterssl.errors import ShardsError
from clusterssl.shards.convert import ConvertOptions, convert
from clusterssl.shards.format import IMAGE_EXT, INDEX_EXT, LABEL_EXT, decode_int
from clusterssl.shards.manifest import load_manifest
from clusterssl.shards.reader import IndexedReader, iter_samples
from clusterssl.shards.sources import ImageFolderSource


@pytest.fixture
def shard_set(image_folder: ImageFolder, tmp_path: Path) -> Path:
    """15 good inputs and 3 skipped ones in shards of 4: indices renumbered after the holes."""
    corrupt_inputs(image_folder)
    out = tmp_path / "shards"
    convert(ImageFolderSource(image_folder.root), out, ConvertOptions(samples_per_shard=4))
    return out


def test_dali_webdataset_reader_reads_our_shards_with_our_indexes(shard_set: Path) -> None:
    from nvidia.dali import fn, pipeline_def, types

    manifest = load_manifest(shard_set)
    expected = {s.index: s for s in iter_samples(shard_set)}
    batch_size = 4

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def read_shards():  # type: ignore[no-untyped-def]
        jpegs, labels, indices = fn.readers.webdataset(
            paths=[str(p) for p in manifest.shard_paths()],
            index_paths=[str(p) for p in manifest.index_paths()],
            ext=[IMAGE_EXT, LABEL_EXT, INDEX_EXT],
            dtypes=[types.UINT8, types.INT64, types.INT64],
            missing_component_behavior="error",
            pad_last_batch=True,
            name="reader",
        )
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        return jpegs, labels, indices, images

    pipe = read_shards()
    pipe.build()
    assert pipe.epoch_size("reader") == manifest.count
    seen = []
    for _ in range(-(-manifest.count // batch_size)):
        jpegs, labels, indices, images = pipe.run()
        for i in range(batch_size):
            index = int(np.asarray(indices[i])[0])
            sample = expected[index]
            assert int(np.asarray(labels[i])[0]) == sample.label
            assert np.asarray(jpegs[i]).tobytes() == sample.jpeg
            assert np.asarray(images[i]).shape == (20, 24, 3)
            seen.append(index)
    assert seen[: manifest.count] == list(range(manifest.count)), (
        "DALI reads in shard order, every index once"
    )


def test_webdataset_groups_the_same_samples(shard_set: Path) -> None:
    import webdataset as wds

    ours = list(iter_samples(shard_set))
    theirs = list(
        wds.WebDataset([str(p) for p in load_manifest(shard_set).shard_paths()], shardshuffle=False)
    )
    assert [s["__key__"] for s in theirs] == [s.key for s in ours]
    assert [decode_int(s[INDEX_EXT]) for s in theirs] == [s.index for s in ours] == list(range(15))
    assert [int(s["cls"]) for s in theirs] == [s.label for s in ours]
    assert [s["jpg"] for s in theirs] == [s.jpeg for s in ours]


def test_indexed_reader_returns_what_the_stream_returns(shard_set: Path) -> None:
    stream = {s.index: s for s in iter_samples(shard_set)}
    reader = IndexedReader(shard_set)
    assert len(reader) == 15
    wanted = [14, 0, 7, 3, 3, 12, 4]
    got = reader.read(wanted, decode=True)
    assert [s.index for s in got] == wanted
    for sample in got:
        reference = stream[sample.index]
        assert (sample.key, sample.jpeg, sample.label, sample.src) == (
            reference.key,
            reference.jpeg,
            reference.label,
            reference.src,
        )
        assert sample.image is not None and sample.image.size == (24, 20)
    for number, shard in enumerate(load_manifest(shard_set).shards):
        start, stop = shard.index_range
        assert reader.locate(start) == (number, 0) and reader.locate(stop - 1) == (number, shard.count - 1)
    with pytest.raises(ShardsError, match=r"outside 0\.\.14"):
        reader.read([15])


def test_decoded_stream_matches_the_source_pixels(tmp_path: Path) -> None:
    root = tmp_path / "images" / "x"
    root.mkdir(parents=True)
    data = jpeg_bytes(np.random.default_rng(0), (33, 17))
    (root / "a.jpg").write_bytes(data)
    convert(ImageFolderSource(root.parent), tmp_path / "out", ConvertOptions())
    (sample,) = iter_samples(tmp_path / "out", decode=True)

    assert sample.image is not None
    assert np.array_equal(np.asarray(sample.image), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_webdataset_stock_decode_reads_every_sample(shard_set: Path) -> None:
    """`WebDataset(urls).decode("rgb8")`, webdataset's own recipe: images as uint8 arrays, `cls` as an
    int, and our typed components left as their bytes (no DecodingError)."""
    import webdataset as wds

    ours = {s.key: s for s in iter_samples(shard_set, decode=True)}
    urls = [str(p) for p in load_manifest(shard_set).shard_paths()]
    theirs = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(theirs) == len(ours) == 15
    for sample in theirs:
        mine = ours[sample["__key__"]]
        assert sample["cls"] == mine.label
        assert decode_int(sample[LABEL_EXT]) == mine.label and decode_int(sample[INDEX_EXT]) == mine.index
        assert sample["src"] == mine.src.encode()
        assert sample["jpg"].dtype == np.uint8 and np.array_equal(sample["jpg"], np.asarray(mine.image))
    # and the usual tuple recipe on top of it
    pairs = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("jpg", "cls"))
    assert sorted(label for _, label in pairs) == sorted(s.label for s in ours.values())
