"""Shard sets for the loader tests: generated images converted with the project's converter, and the
damage a loader must survive (a garbage JPEG, a truncated tar) applied to the converted shards."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from clusterssl.shards.convert import ConvertOptions, convert
from clusterssl.shards.format import IMAGE_EXT
from clusterssl.shards.manifest import load_manifest
from clusterssl.shards.reader import iter_shard
from clusterssl.shards.sources import ImageFolderSource
from clusterssl.shards.tario import read_dali_index, sample_components


def synthetic_jpeg(rng: np.random.Generator, height: int, width: int, quality: int = 90) -> bytes:
    """A smooth, colourful image with some texture (so colour statistics have something to measure)."""
    low = rng.random((max(2, height // 8), max(2, width // 8), 3)) * 255
    image = Image.fromarray(low.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 8, (height, width, 1))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_shard_set(
    directory: Path,
    count: int,
    samples_per_shard: int,
    *,
    seed: int = 0,
    num_classes: int = 3,
    size_range: tuple[int, int] = (24, 48),
) -> Path:
    """Convert ``count`` generated JPEGs (``num_classes`` folders, sides in ``size_range``) into shards
    of ``samples_per_shard`` (the last one shorter) under ``directory``; returns it."""
    rng = np.random.default_rng(seed)
    images = directory.parent / f"{directory.name}-images"
    for i in range(count):
        folder = images / f"class{i % num_classes}"
        folder.mkdir(parents=True, exist_ok=True)
        height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
        (folder / f"{i:05d}.jpg").write_bytes(synthetic_jpeg(rng, height, width))
    convert(
        ImageFolderSource(images), directory, ConvertOptions(samples_per_shard=samples_per_shard, seed=seed)
    )
    return directory


def labels_by_index(directory: Path) -> dict[int, int]:
    """Global index → label, read back with the shards package's own reader."""
    manifest = load_manifest(directory)
    return {s.index: s.label for path in manifest.shard_paths() for s in iter_shard(path)}


def spoil_jpeg(directory: Path, index: int) -> None:
    """Overwrite the image of sample ``index`` with garbage of the same length (the tar stays valid)."""
    manifest = load_manifest(directory)
    shard = next(s for s in manifest.shards if s.index_range[0] <= index < s.index_range[1])
    entry = sample_components(read_dali_index(directory / shard.index_file), IMAGE_EXT)[
        index - shard.index_range[0]
    ]
    garbage = np.random.default_rng(index).integers(0, 256, entry.size, dtype=np.uint8).tobytes()
    with open(directory / shard.file, "r+b") as handle:
        handle.seek(entry.offset)
        handle.write(garbage)


def replace_jpeg(directory: Path, index: int, change: Callable[[bytes], bytes]) -> None:
    """Rewrite the image of sample ``index`` in place with ``change(image)`` (of the same length)."""
    manifest = load_manifest(directory)
    shard = next(s for s in manifest.shards if s.index_range[0] <= index < s.index_range[1])
    entry = sample_components(read_dali_index(directory / shard.index_file), IMAGE_EXT)[
        index - shard.index_range[0]
    ]
    with open(directory / shard.file, "r+b") as handle:
        handle.seek(entry.offset)
        changed = change(handle.read(entry.size))
        assert len(changed) == entry.size
        handle.seek(entry.offset)
        handle.write(changed)


def truncate_shard(directory: Path, shard_number: int, keep: int) -> list[int]:
    """Cut shard ``shard_number`` inside the image of its sample ``keep``; returns the lost indices."""
    manifest = load_manifest(directory)
    shard = manifest.shards[shard_number]
    entry = sample_components(read_dali_index(directory / shard.index_file), IMAGE_EXT)[keep]
    os.truncate(directory / shard.file, entry.offset + entry.size // 2)
    return list(range(shard.index_range[0] + keep, shard.index_range[1]))
