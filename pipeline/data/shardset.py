"""Which shards an epoch reads, how many samples each holds, and how to read one sample from them.

``resolve_shards(data)`` accepts what users pass as ``data``:

    "out/train"                                   a shard directory (its manifest.json)
    "out/train/manifest.json"                     the manifest itself
    ["out/train/shard-{000000..000009}.tar"]     shard URLs: local paths, brace patterns,
    ["pipe:curl -s http://host/shard-000000.tar"]  ``pipe:`` commands (torch backend only)

Sample counts and global index ranges always come from a manifest: the one next to local shards, or the
one given as ``manifest=``. Inside a shard, the sample at position p has global index
``index_range[0] + p`` (the converter writes them in that order; the readers check it).

Two readers serve ``read(position) -> {ext: bytes}``: ``IndexedShardReader`` seeks with the DALI index
(local shards: random access, nothing read twice), ``StreamShardReader`` streams the tar with webdataset's
tar iterator (any URL webdataset's ``gopen`` opens, e.g. ``pipe:``), caching the samples read ahead that
the caller said it will want.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterssl.errors import PipelineError, ShardsError
from clusterssl.shards.format import (
    IMAGE_EXT,
    INDEX_EXT,
    LABEL_EXT,
    MANIFEST_NAME,
    READABLE_VERSIONS,
    current_names,
    decode_int,
    stored_ext,
)
from clusterssl.shards.manifest import Manifest, load_manifest
from clusterssl.shards.tario import IndexComponent, TruncatedSample, read_dali_index, read_indexed_sample

REQUIRED_EXTS = (IMAGE_EXT, LABEL_EXT, INDEX_EXT)
_STORED_EXTS = tuple(sorted({stored_ext(ext, v) for ext in REQUIRED_EXTS for v in READABLE_VERSIONS}))
"""The required components under the names of every readable format version (read, then renamed)."""
"""The components the loaders read: image, binary label, binary global index."""

_TAR_NAME = re.compile(r"([^/\s'\"]+\.tar)\b")


class SampleUnavailable(Exception):
    """A sample that cannot be read (truncated tar, missing component): skipped and counted by the loader."""

    def __init__(self, where: str, reason: str) -> None:
        reason = one_line(reason)
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


_STACK_TRACE = re.compile(
    r"^\s*(Stacktrace\b|Exception raised from\b|frame #\d|\[frame \d|Traceback \()", re.M
)
ONE_LINE_LIMIT = 300


def one_line(reason: str) -> str:
    """A decoder's or reader's message as one line: what comes before a stack trace (DALI and torch
    append dozens of C++ frames), its lines joined, cut at ``ONE_LINE_LIMIT`` characters."""
    trace = _STACK_TRACE.search(reason)
    text = " ".join((reason[: trace.start()] if trace else reason).split())
    return text if len(text) <= ONE_LINE_LIMIT else text[: ONE_LINE_LIMIT - 1] + "…"


@dataclass(frozen=True)
class ShardInfo:
    url: str
    """What the readers open: a local path or a URL webdataset's gopen understands."""
    file: str
    """The shard's file name (its manifest entry)."""
    count: int
    first_index: int
    """Global index of the shard's first sample; the sample at position p has first_index + p."""
    local_path: Path | None = None
    index_path: Path | None = None
    """The DALI index next to a local shard, when it exists."""

    def where(self, position: int) -> str:
        """A human-readable location for messages: ``shard-000003.tar #17 (index 3017)``."""
        return f"{self.file} #{position} (index {self.first_index + position})"


@dataclass
class ShardSet:
    shards: list[ShardInfo]
    manifest: Manifest
    """The manifest the counts come from (the shards may be a subset of its shards)."""

    @property
    def num_indices(self) -> int:
        """N: global indices are 0..N-1 (``repeats`` arrays have this length)."""
        return self.manifest.count

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @property
    def counts(self) -> list[int]:
        return [s.count for s in self.shards]

    @property
    def total(self) -> int:
        """Samples in these shards."""
        return sum(s.count for s in self.shards)

    @property
    def indexed(self) -> bool:
        """Every shard is a local file with its DALI index (what DALI and random access need)."""
        return all(s.index_path is not None for s in self.shards)

    @property
    def root(self) -> Path | None:
        return self.manifest.root


def _is_url(text: str) -> bool:
    return text.startswith("pipe:") or "://" in text


def expand_urls(patterns: Iterable[str]) -> list[str]:
    """Brace patterns expanded in order (``shard-{000..002}.tar`` → 3 URLs), as webdataset does."""
    from braceexpand import braceexpand

    urls: list[str] = []
    for pattern in patterns:
        urls.extend(braceexpand(str(pattern)))
    return urls


def _manifest_for(urls: Sequence[str], manifest: Manifest | str | Path | None) -> Manifest:
    if isinstance(manifest, Manifest):
        return manifest
    if manifest is not None:
        return load_manifest(manifest)
    parents = {Path(u).resolve().parent for u in urls if not _is_url(u)}
    if len(parents) == 1:
        candidate = next(iter(parents)) / MANIFEST_NAME
        if candidate.is_file():
            return load_manifest(candidate)
    where = ", ".join(sorted(str(p) for p in parents)) or "next to the URLs"
    raise PipelineError(
        f"cannot tell how many samples the shards hold: no {MANIFEST_NAME} in {where}; "
        "pass the shard directory, or give the set's manifest.json (data.manifest / data.val_manifest "
        "in a config, --manifest / --train-manifest / --val-manifest on the command line, manifest= in Python)"
    )


def _check_counts(manifest: Manifest) -> None:
    """Refuse a manifest whose total disagrees with its shards, or whose shards' index ranges do not
    tile 0..N-1: every count the loader plans with (epoch length, feature bank rows) would be wrong."""
    where = manifest.root or "the shard set"
    held = sum(entry.count for entry in manifest.shards)
    if held != manifest.count:
        raise PipelineError(
            f"the manifest of {where} says {manifest.count} samples but its shards hold {held}; "
            "the set was changed after conversion (`clusterssl shards verify` says where)"
        )
    start = 0
    for entry in manifest.shards:
        if entry.index_range != (start, start + entry.count):
            raise PipelineError(
                f"the manifest of {where} gives {entry.file} the index range {list(entry.index_range)} "
                f"instead of {[start, start + entry.count]} (`clusterssl shards verify` says more)"
            )
        start += entry.count


def _file_name(url: str) -> str:
    if not _is_url(url):
        return Path(url).name
    found = _TAR_NAME.findall(url)
    if not found:
        raise PipelineError(f"cannot find a .tar file name in {url!r} to look its count up in the manifest")
    return found[-1].rsplit("/", 1)[-1]


def _shard_info(url: str, manifest: Manifest) -> ShardInfo:
    entries = {entry.file: entry for entry in manifest.shards}
    name = _file_name(url)
    entry = entries.get(name)
    if entry is None:
        raise PipelineError(f"{name} is not listed in the manifest of {manifest.root or 'the shard set'}")
    if _is_url(url):
        return ShardInfo(url, name, entry.count, entry.index_range[0])
    path = Path(url).resolve()
    if not path.is_file():
        raise PipelineError(f"shard file not found: {path}")
    index = path.parent / entry.index_file
    return ShardInfo(
        str(path), name, entry.count, entry.index_range[0], path, index if index.is_file() else None
    )


def resolve_shards(
    data: ShardSet | str | Path | Sequence[str | Path], manifest: Manifest | str | Path | None = None
) -> ShardSet:
    """The shards ``data`` names, with counts and index ranges from the manifest (see module docstring)."""
    if isinstance(data, ShardSet):
        return data
    try:
        if isinstance(data, (str, Path)):
            text = str(data)
            path = Path(text)
            if not _is_url(text) and "{" not in text and (path.is_dir() or path.suffix == ".json"):
                found = load_manifest(path) if manifest is None else _manifest_for([], manifest)
                _check_counts(found)
                urls = [str(p) for p in found.shard_paths()]
                return ShardSet([_shard_info(u, found) for u in urls], found)
            if not _is_url(text) and "{" not in text and not path.exists():
                raise PipelineError(f"no shard set at {text}: no such file or directory")
            data = [text]
        urls = expand_urls(str(d) for d in data)
        if not urls:
            raise PipelineError("no shards given")
        found = _manifest_for(urls, manifest)
        _check_counts(found)
        shards = [_shard_info(u, found) for u in urls]
    except ShardsError as error:
        raise PipelineError(str(error)) from None
    duplicates = [name for name, n in Counter(s.file for s in shards).items() if n > 1]
    if duplicates:
        raise PipelineError(f"shard(s) listed twice: {', '.join(duplicates)}")
    return ShardSet(shards, found)


# --- reading --------------------------------------------------------------------------------------------


def check_sample_index(shard: ShardInfo, position: int, components: dict[str, bytes]) -> int:
    """The sample's global index; PipelineError if it is not the one the manifest promises."""
    try:
        index = decode_int(components[INDEX_EXT])
    except ValueError as error:
        raise SampleUnavailable(shard.where(position), f"bad index component ({error})") from None
    expected = shard.first_index + position
    if index != expected:
        raise PipelineError(
            f"{shard.file} does not match its manifest: sample #{position} has index {index}, "
            f"expected {expected} (was the set rewritten without its manifest?)"
        )
    return index


def _missing(components: dict[str, bytes]) -> list[str]:
    return [ext for ext in REQUIRED_EXTS if ext not in components]


class IndexedShardReader:
    """Random access to a local shard through its DALI index: one ``pread`` per component."""

    def __init__(self, shard: ShardInfo) -> None:
        if shard.local_path is None or shard.index_path is None:
            raise ValueError("IndexedShardReader needs a local shard with its DALI index")
        self.shard = shard
        try:
            self.samples: list[list[IndexComponent]] = read_dali_index(shard.index_path)
        except (OSError, ValueError) as error:
            raise PipelineError(f"cannot read the DALI index {shard.index_path}: {error}") from None
        if len(self.samples) != shard.count:
            raise PipelineError(
                f"{shard.index_path.name} lists {len(self.samples)} samples, the manifest {shard.count}"
            )
        self._fd: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._fd is None:
            assert self.shard.local_path is not None
            self._fd = os.open(self.shard.local_path, os.O_RDONLY)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def read(self, position: int) -> dict[str, bytes]:
        fd = self._open()
        try:
            components = current_names(read_indexed_sample(fd, self.samples[position], self._size, _STORED_EXTS))
        except TruncatedSample:
            raise SampleUnavailable(
                self.shard.where(position), "truncated tar (sample past the end of the file)"
            ) from None
        missing = _missing(components)
        if missing:
            raise SampleUnavailable(self.shard.where(position), f"no {', '.join(missing)} component")
        return components

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StreamShardReader:
    """Sequential reading of a tar from any URL (local path, ``pipe:``…) with webdataset's tar iterator.

    ``want(positions)`` tells the reader which positions will be asked for (with multiplicity); samples
    met on the way to a requested one are kept only if still wanted, so memory stays within the caller's
    shuffle window. Asking for a position already passed and not kept re-opens the stream.
    """

    def __init__(self, shard: ShardInfo) -> None:
        self.shard = shard
        self._samples: Iterator[tuple[str, dict[str, bytes]]] | None = None
        self._next = 0
        self._wanted: Counter[int] = Counter()
        self._kept: dict[int, dict[str, bytes]] = {}
        self._failure: SampleUnavailable | None = None
        self._stream: Any = None

    def want(self, positions: Iterable[int]) -> None:
        self._wanted.update(int(p) for p in positions)

    def _open(self) -> None:
        import webdataset as wds
        from webdataset.tariterators import tar_file_iterator

        self.close()
        try:
            self._stream = wds.gopen(self.shard.url)
        except Exception as error:  # gopen raises whatever the opener raises
            raise PipelineError(f"cannot open {self.shard.url}: {error}") from None
        self._samples = _group_members(tar_file_iterator(self._stream))
        self._next, self._failure = 0, None

    def _advance(self) -> tuple[int, dict[str, bytes]]:
        assert self._samples is not None
        where = self.shard.where(self._next)
        if self._failure is not None:
            raise SampleUnavailable(where, self._failure.reason)
        try:
            _key, components = next(self._samples)
        except StopIteration:
            self._failure = SampleUnavailable(where, "truncated tar (the stream ended early)")
            raise self._failure from None
        except Exception as error:  # tarfile/gopen errors on a damaged stream
            message = str(error).split(" @ ")[0]  # webdataset appends a long description of the stream
            self._failure = SampleUnavailable(where, f"truncated or damaged tar ({message})")
            raise self._failure from None
        position, self._next = self._next, self._next + 1
        return position, components

    def read(self, position: int) -> dict[str, bytes]:
        if position in self._kept:
            components = self._kept[position]
            self._release(position)
            return components
        if self._samples is None or position < self._next:
            self._open()
        while True:
            current, components = self._advance()
            if current == position:
                self._release(position)
                break
            if self._wanted[current] > 0:
                self._kept[current] = components
        missing = _missing(components)
        if missing:
            raise SampleUnavailable(self.shard.where(position), f"no {', '.join(missing)} component")
        return components

    def _release(self, position: int) -> None:
        self._wanted[position] -= 1
        if self._wanted[position] <= 0:
            self._wanted.pop(position, None)
            self._kept.pop(position, None)

    def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):  # a pipe whose command failed has nothing left to release
                self._stream.close()
            self._stream = None
        self._samples = None


def _group_members(members: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive tar members sharing a key (name up to the first dot) → one sample."""
    key: str | None = None
    components: dict[str, bytes] = {}
    try:
        for member in members:
            name = member["fname"].rsplit("/", 1)[-1]
            member_key, _, ext = name.partition(".")
            if member_key != key:
                if key is not None:
                    yield key, current_names(components)
                key, components = member_key, {}
            components[ext.lower()] = member["data"]
    except Exception:
        # A damaged stream: the members read so far are whole, so the current sample is usable if it has
        # what the loader needs (the caller checks); the error then ends the shard.
        if key is not None:
            yield key, current_names(components)
        raise
    if key is not None:
        yield key, current_names(components)


def open_reader(shard: ShardInfo) -> IndexedShardReader | StreamShardReader:
    """Random access when the shard is local with its index, else a stream."""
    if shard.index_path is not None:
        return IndexedShardReader(shard)
    return StreamShardReader(shard)
