"""Interim shard sets for the loader tests, written with the project's own tar writer and manifest.

Replaced by the converter (``shards.convert``) once it is on main; until then this writes the format
described in ``shards/format.py``: components jpg, cls, label, index, src; position p of a shard holds
global index ``first + p``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from shards.format import dali_index_path, encode_int, sample_key, shard_file_name
from shards.manifest import Manifest, ShardEntry
from shards.tario import ShardTarWriter


def synthetic_jpeg(rng: np.random.Generator, height: int, width: int, quality: int = 90) -> bytes:
    """A smooth colourful image with some texture, JPEG-encoded."""
    low = rng.random((max(2, height // 8), max(2, width // 8), 3)) * 255
    image = Image.fromarray(low.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 8, (height, width, 1))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_shard_set(
    directory: Path,
    counts: Sequence[int] = (7, 5, 9),
    *,
    seed: int = 0,
    num_classes: int = 3,
    size_range: tuple[int, int] = (24, 48),
    bad_jpeg: Sequence[int] = (),
    truncate_after: dict[int, int] | None = None,
) -> Path:
    """Write shards with ``counts`` samples each into ``directory``; returns the directory.

    bad_jpeg:       global indices whose image bytes are replaced by garbage
    truncate_after: {shard number: samples kept} — the tar is cut inside the next sample's image
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, index = [], 0
    for number, count in enumerate(counts):
        path = directory / shard_file_name(number)
        with ShardTarWriter(path) as writer:
            for position in range(count):
                height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
                jpeg = synthetic_jpeg(rng, height, width)
                if index in bad_jpeg:
                    jpeg = bytes(rng.integers(0, 256, len(jpeg), dtype=np.uint8))
                label = index % num_classes
                writer.add_sample(
                    sample_key(number, position),
                    [
                        ("jpg", jpeg),
                        ("cls", str(label).encode()),
                        ("label", encode_int(label)),
                        ("index", encode_int(index)),
                        ("src", f"synthetic/{index}.jpg".encode()),
                    ],
                )
                index += 1
        writer.write_dali_index(dali_index_path(path))
        entries.append(
            ShardEntry(
                file=path.name,
                index_file=dali_index_path(path).name,
                count=count,
                bytes=writer.bytes_written,
                sha256=writer.sha256,
                index_range=(index - count, index),
            )
        )
        kept = (truncate_after or {}).get(number)
        if kept is not None:
            cut = writer.samples[kept][0].offset + writer.samples[kept][0].size // 2
            with open(path, "r+b") as handle:
                handle.truncate(cut)
    Manifest(count=index, classes=[str(c) for c in range(num_classes)], shards=entries).save(directory)
    return directory
