"""The IDX format of MNIST, Fashion-MNIST, KMNIST and EMNIST: an image file and a label file per split.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 per dimension, then the values in row-major order. Images are ``(count, rows, cols)`` unsigned
bytes (magic ``00 00 08 03``), labels ``(count,)`` unsigned bytes (``00 00 08 01``); either may be gzipped.

The header is checked against the data before anything is allocated for it, so a file whose dimensions or
counts disagree with its size (cut short, padded, or hostile) is one clear error instead of a crash.
"""

from __future__ import annotations

import gzip
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from PIL import Image

from clusterssl.errors import ShardsError
from clusterssl.shards.images import encode_jpeg
from clusterssl.shards.sources import InputItem, Listing, Source

if TYPE_CHECKING:
    import numpy as np

    from clusterssl.shards.convert import ConvertOptions, ConvertOutcome

UBYTE = 0x08
IMAGE_DIMS = 3
LABEL_DIMS = 1
_CHUNK = 1 << 20

_PAIR_NAME = re.compile(r"^(?P<prefix>.*?)(?P<split>train|t10k|test)-images-idx3-ubyte(?P<gz>\.gz)?$")
"""``train-images-idx3-ubyte``, ``t10k-images-idx3-ubyte.gz``, ``emnist-letters-test-images-idx3-ubyte``…"""
SPLIT_NAMES = {"train": "train", "t10k": "test", "test": "test"}


def read_idx(path: str | Path, dims: int) -> np.ndarray:
    """The uint8 array of an IDX file with ``dims`` dimensions; raises ``ShardsError`` on a bad file."""
    import numpy as np

    path = Path(path)
    try:
        with _open(path) as handle:
            header = handle.read(4)
            if len(header) != 4 or header[:2] != b"\0\0":
                raise ShardsError(f"{path}: not an IDX file (bad magic {header.hex() or 'empty'})")
            if header[2] != UBYTE or header[3] != dims:
                raise ShardsError(
                    f"{path}: IDX magic {header.hex()} is not unsigned bytes in {dims} dimension(s) "
                    f"(expected 000008{dims:02x})"
                )
            raw_shape = handle.read(4 * dims)
            if len(raw_shape) != 4 * dims:
                raise ShardsError(f"{path}: IDX header cut short")
            shape = tuple(int.from_bytes(raw_shape[i : i + 4], "big") for i in range(0, 4 * dims, 4))
            expected = _product(shape)
            data = _read_exactly(handle, expected, path, shape)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise ShardsError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _open(path: Path) -> BinaryIO:
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _product(shape: tuple[int, ...]) -> int:
    total = 1
    for side in shape:
        total *= side
    return total


def _read_exactly(handle: BinaryIO, expected: int, path: Path, shape: tuple[int, ...]) -> bytes:
    """The ``expected`` data bytes, read in chunks so that a header claiming terabytes allocates only
    what the file really holds before the mismatch is reported."""
    buffer = io.BytesIO()
    while buffer.tell() <= expected:
        chunk = handle.read(min(_CHUNK, expected + 1 - buffer.tell()))
        if not chunk:
            break
        buffer.write(chunk)
    if buffer.tell() != expected:
        relation = "more" if buffer.tell() > expected else f"only {buffer.tell()}"
        raise ShardsError(
            f"{path}: the IDX header says {' x '.join(map(str, shape))} = {expected} bytes of data, "
            f"but the file holds {relation}"
        )
    return buffer.getvalue()


@dataclass(frozen=True)
class IdxPair:
    """One split: an image file and its label file."""

    images: Path
    labels: Path


def labels_for(images: Path) -> Path:
    """``…-images-idx3-ubyte[.gz]`` → the ``…-labels-idx1-ubyte[.gz]`` beside it."""
    name = images.name.replace("-images-idx3-ubyte", "-labels-idx1-ubyte")
    if name == images.name:
        raise ShardsError(
            f"cannot tell the label file of {images} from its name (expected '*-images-idx3-ubyte[.gz]'); "
            "pass it with --labels"
        )
    return images.with_name(name)


def find_pairs(directory: Path) -> dict[str, IdxPair]:
    """``{"train": …, "test": …}``: the ``train-*`` and ``t10k-*`` (or ``test-*``) pairs in ``directory``."""
    if not directory.is_dir():
        raise ShardsError(f"IDX source directory does not exist: {directory}")
    found: dict[str, IdxPair] = {}
    for path in sorted(directory.iterdir()):
        match = _PAIR_NAME.match(path.name)
        if match is None:
            continue
        split = SPLIT_NAMES[match["split"]]
        if split in found:
            raise ShardsError(
                f"{directory} holds more than one {split} image file ({found[split].images.name}, "
                f"{path.name}); convert one pair at a time"
            )
        labels = labels_for(path)
        if not labels.is_file():
            raise ShardsError(f"{path} has no label file {labels.name} beside it")
        found[split] = IdxPair(path, labels)
    if not found:
        raise ShardsError(f"no '*-images-idx3-ubyte[.gz]' files in {directory}")
    return found


class IdxSource(Source):
    """One IDX pair; each image becomes a greyscale JPEG of the given quality, its label the class id.

    References are ``<image file stem>/<row>`` (rows zero-padded so they sort in file order). The arrays
    are loaded on first use in each process and never pickled: shard tasks carry only the paths.
    """

    kind = "idx"

    def __init__(self, images: str | Path, labels: str | Path, jpeg_quality: int = 100) -> None:
        self.images = Path(images)
        self.labels = Path(labels)
        self.jpeg_quality = jpeg_quality
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.images.resolve()),
            "labels": str(self.labels.resolve()),
            "jpeg_quality": self.jpeg_quality,
        }

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(images (N, rows, cols) uint8, labels (N,) uint8)``, checked against each other."""
        if self._arrays is None:
            for path in (self.images, self.labels):
                if not path.is_file():
                    raise ShardsError(f"IDX file does not exist: {path}")
            images = read_idx(self.images, IMAGE_DIMS)
            labels = read_idx(self.labels, LABEL_DIMS)
            if len(images) != len(labels):
                raise ShardsError(
                    f"{self.images} holds {len(images)} images but {self.labels} {len(labels)} labels"
                )
            if len(images) == 0 or 0 in images.shape[1:]:
                raise ShardsError(f"{self.images} holds no images (shape {images.shape})")
            self._arrays = (images, labels)
        return self._arrays

    def list_inputs(self) -> Listing:
        images, labels = self.load()
        width = len(str(len(images) - 1))
        stem = self.images.name.removesuffix(".gz")
        size = images.shape[1] * images.shape[2]  # about a byte per pixel: only steers --bytes-per-shard
        items = [InputItem(f"{stem}/{row:0{width}d}", int(label), size) for row, label in enumerate(labels)]
        return Listing(items, [str(c) for c in range(int(labels.max()) + 1)])

    def read(self, ref: str) -> bytes:
        images, _ = self.load()
        return encode_jpeg(Image.fromarray(images[int(ref.rsplit("/", 1)[1])]), self.jpeg_quality)


def convert_idx_directory(
    directory: Path, out: Path, options: ConvertOptions, *, jpeg_quality: int = 100, progress: bool = False
) -> dict[str, ConvertOutcome]:
    """Every IDX pair of ``directory`` converted into ``out/<split>`` (``train``, ``test``), by split.
    The files are split already, so ``options.holdout`` must be None (the callers say so in their terms)."""
    from clusterssl.shards.convert import convert

    return {
        split: convert(
            IdxSource(pair.images, pair.labels, jpeg_quality), out / split, options, progress=progress
        )
        for split, pair in sorted(find_pairs(directory).items())
    }
