"""The work one worker process does: write one whole shard, or renumber one written shard.

Both functions are pure functions of their task (plus the files), so they run the same in the parent
(``--workers 1``) and in a pool, and a task interrupted half-way can simply be run again.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterssl.errors import ShardsError
from clusterssl.shards.format import (
    INDEX_EXT,
    INT_SIZE,
    dali_index_path,
    encode_int,
    encode_sample,
    sample_key,
)
from clusterssl.shards.images import BadInput, PrepareOptions, prepare_image
from clusterssl.shards.jpeg import LARGE_SIDE
from clusterssl.shards.native import FilePacker
from clusterssl.shards.tario import ShardTarWriter, file_sha256, read_dali_index, sample_components

if TYPE_CHECKING:
    from clusterssl.shards.sources import Source

TMP_SUFFIX = ".tmp"
WRITE_BEHIND = 8 << 20
"""Where a filesystem refuses direct I/O and shards go through the page cache: start the disk writeback
every 8 MiB, so the final fsync does not stall the worker (measured with buffered writes: 8,000 ~50 KB
JPEGs with 2 workers, 1.82 s against 2.0 s without, median of 4 each)."""
WRITE_BATCH = 64
"""Samples handed to the tar writer at once (about 3 MB of ~50 KB images): enough to spread the cost of
laying out their headers together, small enough to keep a worker's memory flat."""


@dataclass(frozen=True)
class ShardTask:
    """Write shard ``number`` of the set in ``directory`` from ``inputs`` = (ref, label, planned index)."""

    source: Source
    set_name: str
    directory: str
    number: int
    file: str
    inputs: list[tuple[str, int, int]]
    options: PrepareOptions


@dataclass
class ShardResult:
    """What a written shard holds; one line of the conversion journal."""

    set_name: str
    number: int
    file: str
    index_file: str
    count: int
    bytes: int
    sha256: str
    planned_range: tuple[int, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(ref, reason) of the inputs that could not become samples, in planned order."""
    label_counts: dict[int, int] = field(default_factory=dict)
    large_sides: list[int] = field(default_factory=list)
    """The longer side of every stored image above ``LARGE_SIDE`` pixels (for ``shards info``)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "set": self.set_name,
            "shard": self.number,
            "file": self.file,
            "index_file": self.index_file,
            "count": self.count,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "planned_range": list(self.planned_range),
            "skipped": [list(s) for s in self.skipped],
            "label_counts": {str(k): v for k, v in sorted(self.label_counts.items())},
            "large_sides": self.large_sides,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardResult:
        return cls(
            set_name=str(data["set"]),
            number=int(data["shard"]),
            file=str(data["file"]),
            index_file=str(data["index_file"]),
            count=int(data["count"]),
            bytes=int(data["bytes"]),
            sha256=str(data["sha256"]),
            planned_range=(int(data["planned_range"][0]), int(data["planned_range"][1])),
            skipped=[(str(ref), str(reason)) for ref, reason in data["skipped"]],
            label_counts={int(k): int(v) for k, v in data["label_counts"].items()},
            large_sides=[int(side) for side in data.get("large_sides", [])],  # absent in older journals
        )


def temporary_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


def write_shard(task: ShardTask) -> ShardResult:
    """Read, check and write every input of the task into ``<file>.tmp`` (+ its DALI index), then fsync
    and rename the index and the tar to their final names: a final name always means a complete shard."""
    keep_freed_heap()
    with collector_paused():
        try:
            return _write_shard(task)
        except OSError as error:  # unreadable inputs are skipped inside: this is writing the shard
            target = Path(task.directory) / task.file
            raise ShardsError(
                f"cannot write {target}: {error.strerror or error}; "
                "fix that (free space, permissions) and run the same command again to resume"
            ) from None


def _write_shard(task: ShardTask) -> ShardResult:
    directory = Path(task.directory)
    tar_path = directory / task.file
    idx_path = dali_index_path(tar_path)
    skipped: list[tuple[str, str]] = []
    labels: Counter[int] = Counter()
    large_sides: list[int] = []
    try:
        with ShardTarWriter(temporary_path(tar_path), write_behind=WRITE_BEHIND, direct=True) as writer:
            packer = FilePacker.for_task(task.source.file_root(), task.options)
            if packer is None:
                _write_in_python(task, task.inputs, writer, skipped, labels, large_sides)
            else:
                _write_natively(task, packer, writer, skipped, labels, large_sides)
            # written and synced while the writer thread still writes the tar's last chunks
            writer.write_dali_index(temporary_path(idx_path), fsync=True)
    except BaseException:  # the writer removed its partial tar; the index goes with it
        temporary_path(idx_path).unlink(missing_ok=True)
        raise
    os.replace(temporary_path(idx_path), idx_path)
    os.replace(temporary_path(tar_path), tar_path)
    # No fsync of the directory per shard: a rename lost to a power cut leaves a shard the journal lists
    # but whose file is missing, which a resumed run checks for and writes again; the directory is
    # synced once, before the manifest is written (the set is done only when its manifest exists).
    planned = (task.inputs[0][2], task.inputs[-1][2] + 1) if task.inputs else (0, 0)
    return ShardResult(
        set_name=task.set_name,
        number=task.number,
        file=tar_path.name,
        index_file=idx_path.name,
        count=writer.count,
        bytes=writer.bytes_written,
        sha256=writer.sha256,
        planned_range=planned,
        skipped=skipped,
        label_counts=dict(labels),
        large_sides=large_sides,
    )


def _write_in_python(
    task: ShardTask,
    inputs: list[tuple[str, int, int]],
    writer: ShardTarWriter,
    skipped: list[tuple[str, str]],
    labels: Counter[int],
    large_sides: list[int],
) -> None:
    """Read, check and append ``inputs`` (laid out ``WRITE_BATCH`` samples at a time); an input that
    cannot become a sample is added to ``skipped`` with its reason, the longer side of an image stored
    above ``LARGE_SIDE`` to ``large_sides``."""
    batch: list[tuple[str, list[tuple[str, bytes]]]] = []
    reader = task.source.reader_for([ref for ref, _, _ in inputs])
    for ref, label, planned_index in inputs:
        try:
            prepared = prepare_image(reader.read(ref), task.options)
        except BadInput as error:
            skipped.append((ref, str(error)))
            continue
        except OSError as error:
            skipped.append((ref, f"cannot read: {error.strerror or error}"))
            continue
        key = sample_key(task.number, writer.count + len(batch))
        batch.append((key, encode_sample(prepared.data, label, planned_index, ref)))
        labels[label] += 1
        if max(prepared.width, prepared.height) > LARGE_SIDE:
            large_sides.append(max(prepared.width, prepared.height))
        if len(batch) == WRITE_BATCH:
            writer.add_samples(batch)
            batch = []
    writer.add_samples(batch)


def _write_natively(
    task: ShardTask,
    packer: FilePacker,
    writer: ShardTarWriter,
    skipped: list[tuple[str, str]],
    labels: Counter[int],
    large_sides: list[int],
) -> None:
    """The same as ``_write_in_python`` on all of the task's inputs, with the C loop packing the plain
    JPEG files; each input it refuses goes through the Python path, in its place (it refuses every image
    above ``LARGE_SIDE``, so the Python path sees all the large ones)."""
    inputs = task.inputs
    start = 0
    while start < len(inputs):
        stop = min(start + WRITE_BATCH, len(inputs))
        space = writer.packing_space()
        packed = packer.pack(inputs, start, stop, task.number, writer.count, writer.bytes_written, space)
        del space  # the sink may hand its chunk over in add_packed
        taken = len(packed.lines)
        if taken:
            writer.add_packed(packed.used, packed.blob, packed.lines)
            labels.update([label for _, label, _ in inputs[start : start + taken]])
            start += taken
        if packed.refused:
            _write_in_python(task, inputs[start : start + 1], writer, skipped, labels, large_sides)
            start += 1


@dataclass(frozen=True)
class RenumberTask:
    """Give the samples of a written shard the global indices ``first_index, first_index + 1, …``."""

    set_name: str
    number: int
    tar_path: str
    first_index: int


def renumber_shard(task: RenumberTask) -> tuple[str, int, str]:
    """Patch the 8-byte ``index`` payloads in place (at the offsets the DALI index gives; sizes and
    offsets do not change), fsync, and return ``(set_name, number, new sha256)``. Idempotent."""
    tar_path = Path(task.tar_path)
    try:
        entries = sample_components(read_dali_index(dali_index_path(tar_path)), INDEX_EXT)
    except (OSError, ValueError, KeyError) as error:
        raise ShardsError(f"cannot renumber {tar_path}: its DALI index is unusable ({error})") from None
    with open(tar_path, "r+b") as handle:
        for position, entry in enumerate(entries):
            if entry.size != INT_SIZE:
                raise ShardsError(f"cannot renumber {tar_path}: {entry.name} is not an int64")
            handle.seek(entry.offset)
            handle.write(encode_int(task.first_index + position))
        handle.flush()
        os.fsync(handle.fileno())
    return task.set_name, task.number, file_sha256(tar_path)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: a writer allocates a few small tuples and lists per
    sample, none of them in a cycle, and the collections they trigger cost ~2% of a worker's time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_KEPT = 64 << 20


def keep_freed_heap() -> None:
    """Let glibc keep up to ``HEAP_KEPT`` of freed memory instead of handing it back to the kernel.

    A writer frees a batch of ~50 KB image buffers every few milliseconds; by default glibc returns
    the top of its heap to the kernel each time, and the next batch pays a page fault, a zeroed page and
    a memory-cgroup charge for every 4 KB again (~10% of a worker's time in a profile of the converter
    on this project's VM). Fixing both thresholds also stops glibc from raising them on its own. A no-op
    where glibc is not the C library.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_TRIM_THRESHOLD, HEAP_KEPT)
        libc.mallopt(_M_MMAP_THRESHOLD, 16 << 20)
    except (OSError, AttributeError):
        pass


def fsync_directory(directory: Path) -> None:
    """Make renames inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
