"""Finding unreadable samples before a decoder trips on them.

DALI stops the whole pipeline on a JPEG it cannot decode or a sample past the end of a truncated tar, and
has no option to skip one. So before building a DALI pipeline the loader checks every sample cheaply:

* truncated tar: a sample whose components reach past the end of the file (index offsets vs file size);
* bad JPEG: the converter's own structural walk of the JPEG markers (``shards.jpeg``) — SOI first,
  well-formed segments up to the first SOS, one frame header (SOF) with non-zero dimensions, EOI at the
  end — and a declared size within the pixel limit (``shards.jpeg.DEFAULT_MAX_PIXELS``, Pillow's), so
  that a decompression bomb in shards made elsewhere is skipped instead of decoded every epoch. This
  reads only the header (usually < 1 KB) and the last bytes of each image, and catches empty, garbage and cut-short images, the failures decoders refuse.
  (Damaged entropy-coded data inside an otherwise complete file decodes with a warning in libjpeg-turbo,
  PIL and DALI's CPU decoder alike, so it is not treated as corrupt.)

The result — per sample a status and the image's height and width (DALI's crop boxes need them before
decoding) — is cached in a sidecar next to the manifest (``loader-check.npz``), keyed per shard by file
size and modification time, or in the user cache when the shard directory is read-only. Each rank checks
only the shards its share of the epoch reads, several shards at a time, and skips those the sidecar
already holds (another rank's results included: a save merges with what is on disk).

The torch backend applies the same ``inspect_jpeg`` to the bytes it has read, so both backends skip the
same samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clusterssl.errors import PipelineError
from clusterssl.pipeline.data.shardset import REQUIRED_EXTS, ShardInfo, ShardSet
from clusterssl.shards.format import IMAGE_EXT, current_names
from clusterssl.shards.jpeg import DEFAULT_MAX_PIXELS, ends_properly, pixel_limit_reason, walk_header
from clusterssl.shards.tario import read_dali_index

log = logging.getLogger(__name__)

SIDECAR_NAME = "loader-check.npz"
CHECK_VERSION = 2
"""Part of every cached result's key: raised when the check grows stricter (2: the pixel limit)."""
HEAD_BYTES = 1 << 16
TAIL_BYTES = 32

OK, TRUNCATED, BAD_JPEG, MISSING = 0, 1, 2, 3
STATUS_TEXT = {OK: "ok", TRUNCATED: "truncated tar", BAD_JPEG: "bad JPEG", MISSING: "missing component"}


@dataclass(frozen=True)
class JpegInfo:
    ok: bool
    reason: str = ""
    height: int = 0
    width: int = 0
    header_end: int = 0
    """Bytes up to and including the SOS segment (how much ``head`` had to hold)."""


def inspect_jpeg(
    head: bytes, size: int, tail: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> JpegInfo:
    """Check a JPEG of ``size`` bytes from its first bytes ``head`` and last bytes ``tail``: a sound
    header (``shards.jpeg.walk_header``), an end-of-image marker, and no more than ``max_pixels``.

    Returns ``ok=False`` with ``header_end > len(head)`` when ``head`` is too short to decide (the caller
    reads more and asks again).
    """
    header = walk_header(head, size)
    if not header.ok:
        return JpegInfo(False, header.reason, header_end=header.needs)
    height, width, end = header.height, header.width, header.header_end
    if not ends_properly(tail):
        return JpegInfo(False, "truncated JPEG (no end-of-image marker)", height, width, end)
    too_large = pixel_limit_reason(width, height, max_pixels)
    if too_large:
        # a few hundred bytes can declare gigabytes of pixels, which the decoder would allocate every epoch
        return JpegInfo(False, too_large, height, width, end)
    return JpegInfo(True, "", height, width, end)


def inspect_jpeg_bytes(data: bytes) -> JpegInfo:
    return inspect_jpeg(data, len(data), data[-TAIL_BYTES:])


@dataclass
class ShardCheck:
    """Per-position results for one shard: status code, image height and width (0 when unknown)."""

    status: np.ndarray  # (count,) uint8
    height: np.ndarray  # (count,) int32
    width: np.ndarray  # (count,) int32
    reasons: dict[int, str]

    def bad_positions(self) -> np.ndarray:
        return np.flatnonzero(self.status != OK)


def _read_jpeg_info(fd: int, offset: int, size: int) -> JpegInfo:
    head = os.pread(fd, min(size, HEAD_BYTES), offset)
    tail = os.pread(fd, min(size, TAIL_BYTES), offset + size - min(size, TAIL_BYTES))
    info = inspect_jpeg(head, size, tail)
    if not info.ok and info.header_end > len(head):  # big APP segments: read the whole image
        info = inspect_jpeg_bytes(os.pread(fd, size, offset))
    return info


def check_shard(shard: ShardInfo) -> ShardCheck:
    """Check every sample of a local, indexed shard (see the module docstring)."""
    assert shard.local_path is not None and shard.index_path is not None
    samples = read_dali_index(shard.index_path)
    count = len(samples)
    status = np.zeros(count, np.uint8)
    height = np.zeros(count, np.int32)
    width = np.zeros(count, np.int32)
    reasons: dict[int, str] = {}
    fd = os.open(shard.local_path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        for position, components in enumerate(samples):
            by_ext = current_names({c.ext: c for c in components})  # version 1 sets too
            missing = [ext for ext in REQUIRED_EXTS if ext not in by_ext]
            if missing:
                status[position], reasons[position] = MISSING, f"no {', '.join(missing)} component"
                continue
            if any(c.offset + c.size > file_size for c in components):
                status[position], reasons[position] = (
                    TRUNCATED,
                    "truncated tar (sample past the end of the file)",
                )
                continue
            image = by_ext[IMAGE_EXT]
            info = _read_jpeg_info(fd, image.offset, image.size)
            height[position], width[position] = info.height, info.width
            if not info.ok:
                status[position], reasons[position] = BAD_JPEG, f"bad JPEG ({info.reason})"
    finally:
        os.close(fd)
    return ShardCheck(status, height, width, reasons)


def _signature(shard: ShardInfo) -> list[int]:
    assert shard.local_path is not None and shard.index_path is not None
    tar, index = shard.local_path.stat(), shard.index_path.stat()
    return [CHECK_VERSION, tar.st_size, tar.st_mtime_ns, index.st_size, index.st_mtime_ns]


def sidecar_path(shardset: ShardSet, cache_dir: str | Path | None = None) -> Path:
    """``<shard dir>/loader-check.npz`` when writable, else a file in the user cache named after the dir."""
    root = shardset.root
    if root is not None and os.access(root, os.W_OK):
        return root / SIDECAR_NAME
    base = Path(cache_dir or os.environ.get("CLUSTERSSL_CACHE") or Path.home() / ".cache" / "clusterssl")
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return base / "loader-checks" / f"{digest}.npz"


@dataclass
class _Sidecar:
    """The cached checks: per shard file its signature, reasons and status/height/width arrays."""

    signatures: dict[str, list[int]] = field(default_factory=dict)
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> _Sidecar:
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(str(stored["meta"]))
                arrays = {k: stored[k] for k in stored.files if k != "meta"}
            return cls(meta["signatures"], meta["reasons"], arrays)
        except (OSError, ValueError, KeyError):
            return cls()

    def cached(self, shard: ShardInfo, signature: list[int]) -> ShardCheck | None:
        """The stored check of ``shard`` if it was made of the files as they are now."""
        keys = _array_keys(shard)
        if self.signatures.get(shard.file) != signature or not all(k in self.arrays for k in keys):
            return None
        stored = {int(p): r for p, r in self.reasons.get(shard.file, {}).items()}
        return ShardCheck(*(self.arrays[k] for k in keys), stored)

    def store(self, shard: ShardInfo, signature: list[int], check: ShardCheck) -> None:
        self.signatures[shard.file] = signature
        self.reasons[shard.file] = {str(p): r for p, r in check.reasons.items()}
        self.arrays.update(zip(_array_keys(shard), (check.status, check.height, check.width), strict=True))

    def save_merged(self, path: Path, checked: list[tuple[ShardInfo, list[int], ShardCheck]]) -> None:
        """Add ``checked`` to the sidecar as it is on disk now and write it back atomically.

        Ranks check their own shards at the same time and each saves its results: re-reading just before
        writing keeps what the others saved meanwhile (a write lost to a race only costs a re-check)."""
        latest = _Sidecar.load(path)
        for shard, signature, check in checked:
            latest.store(shard, signature, check)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = json.dumps({"signatures": latest.signatures, "reasons": latest.reasons})
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
                np.savez(handle, meta=np.array(meta), **latest.arrays)
            os.replace(handle.name, path)
        except OSError as error:  # a cache that cannot be written only costs a re-check next time
            log.warning("could not cache the sample check in %s: %s", path, error)


def _array_keys(shard: ShardInfo) -> list[str]:
    return [f"{shard.file}/{name}" for name in ("status", "height", "width")]


CHECK_THREADS = 8
"""Shards checked at once: each sample costs two small reads, so the waits on storage overlap."""


def check_shard_set(
    shardset: ShardSet,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    shards: Sequence[int] | None = None,
    threads: int = CHECK_THREADS,
) -> list[ShardCheck]:
    """``ShardCheck`` of the shards numbered ``shards`` (default: all), in that order.

    A shard whose files are unchanged since its last check comes from the sidecar; the others are
    checked ``threads`` at a time. A rank passes the shards of its own share of the epoch, so no rank
    reads the shards only the others will read.
    """
    if not shardset.indexed:
        raise PipelineError("checking samples needs local shards with their DALI index files")
    numbers = range(len(shardset.shards)) if shards is None else [int(s) for s in shards]
    path = sidecar_path(shardset, cache_dir)
    sidecar = _Sidecar.load(path)
    results: dict[int, ShardCheck] = {}
    unchecked: list[tuple[int, list[int]]] = []
    for number in numbers:
        signature = _signature(shardset.shards[number])
        cached = sidecar.cached(shardset.shards[number], signature)
        if cached is None:
            unchecked.append((number, signature))
        else:
            results[number] = cached
    if unchecked:
        fresh = _check_in_parallel([shardset.shards[number] for number, _ in unchecked], threads, progress)
        results.update(zip((number for number, _ in unchecked), fresh, strict=True))
        checked = [(shardset.shards[number], signature, results[number]) for number, signature in unchecked]
        sidecar.save_merged(path, checked)
    return [results[number] for number in numbers]


def _check_in_parallel(shards: list[ShardInfo], threads: int, progress: bool) -> list[ShardCheck]:
    """``check_shard`` of each shard, in order, ``threads`` at a time (the first error is raised as is)."""
    from tqdm import tqdm

    # The first check of a large set takes a while (two small reads per sample); later runs hit the cache.
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        checks = tqdm(
            pool.map(check_shard, shards),
            total=len(shards),
            desc="checking samples",
            unit="shard",
            leave=False,
            disable=not progress or None,
        )
        return list(checks)
