"""Small IDX files (MNIST's format) written by the tests themselves."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """An array of unsigned bytes in the IDX layout (magic, big-endian dimensions, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_pair(directory: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for name, array in (("images-idx3", images), ("labels-idx1", labels)):
        data = idx_bytes(array)
        (directory / f"{split}-{name}-ubyte{suffix}").write_bytes(gzip.compress(data) if gz else data)
    return directory / f"{split}-images-idx3-ubyte{suffix}"


def random_split(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 9, 7), dtype=np.uint8), rng.integers(0, 10, count, dtype=np.uint8)
