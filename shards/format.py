"""The on-disk contract every other stage reads: sample components, key and file naming, integer encoding.

A sample is a group of consecutive tar members sharing one key (the name up to its first dot):

    <key>.jpg        the image: the source's own bytes when it is a JPEG, else a re-encoding
    <key>.cls        the class id as ASCII text (the WebDataset convention); -1 when unlabelled
    <key>.label.i64  the class id as a little-endian int64 (DALI reads it with dtypes=INT64, no text parsing)
    <key>.index.i64  the global sample index 0..N-1 as a little-endian int64
    <key>.src        the input the sample came from (UTF-8), so a bad sample can be traced back

Keys never contain dots (they are generated, not taken from file names) and extensions are lowercase.
The binary components end in ``.i64``, a suffix no webdataset decoder claims, so that webdataset's stock
``.decode()`` passes them through as bytes (it reads a member by its last suffix, and its default
decoders parse ``.index`` as text). Format version 1 named them ``label`` and ``index``; sets written
then are still read (``current_names``, ``stored_ext``).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"

IMAGE_EXT = "jpg"
CLASS_EXT = "cls"
LABEL_EXT = "label.i64"
INDEX_EXT = "index.i64"
SOURCE_EXT = "src"
COMPONENT_ORDER = (IMAGE_EXT, CLASS_EXT, LABEL_EXT, INDEX_EXT, SOURCE_EXT)

_VERSION_1_NAMES = {LABEL_EXT: "label", INDEX_EXT: "index"}
_CURRENT_NAMES = {old: new for new, old in _VERSION_1_NAMES.items()}


def stored_ext(ext: str, version: int) -> str:
    """The name a component has in the tars of a set of that format version (DALI's ``ext``)."""
    return _VERSION_1_NAMES.get(ext, ext) if version == 1 else ext


def current_names(components: dict[str, T]) -> dict[str, T]:
    """A sample's components under the current names, whichever format version wrote them."""
    if not any(ext in _CURRENT_NAMES for ext in components):
        return components
    return {_CURRENT_NAMES.get(ext, ext): data for ext, data in components.items()}


UNLABELLED = -1
"""Label value of a sample whose source gave no label."""

_INT64_LE = struct.Struct("<q")
INT_SIZE = _INT64_LE.size


def encode_int(value: int) -> bytes:
    """A Python int as 8 little-endian bytes (the ``label`` and ``index`` components)."""
    return _INT64_LE.pack(value)


def decode_int(data: bytes) -> int:
    if len(data) != INT_SIZE:
        raise ValueError(f"an int64 component has {INT_SIZE} bytes, got {len(data)}")
    return _INT64_LE.unpack(data)[0]


def sample_key(shard_number: int, position: int) -> str:
    """Key of the sample at ``position`` in shard ``shard_number``: unique in the set, no dots."""
    return f"s{shard_number:06d}_{position:06d}"


def shard_file_name(shard_number: int, prefix: str = "shard") -> str:
    return f"{prefix}-{shard_number:06d}.tar"


def dali_index_path(tar_path: str | Path) -> Path:
    """The DALI index file that sits next to a tar: ``shard-000000.tar`` → ``shard-000000.idx``."""
    return Path(tar_path).with_suffix(".idx")


def encode_sample(jpeg: bytes, label: int, index: int, src: str) -> list[tuple[str, bytes]]:
    """The components of one sample, in ``COMPONENT_ORDER``, ready for ``ShardTarWriter.add_sample``."""
    return [
        (IMAGE_EXT, jpeg),
        (CLASS_EXT, str(label).encode("ascii")),
        (LABEL_EXT, encode_int(label)),
        (INDEX_EXT, encode_int(index)),
        # surrogateescape: a file name that is not valid UTF-8 still round-trips to the same bytes
        (SOURCE_EXT, src.encode("utf-8", "surrogateescape")),
    ]
