"""How a shard's bytes reach the disk: one file written front to back, hashed on the way.

Two ways, one interface (``write(buffers)``, ``close(fsync)``, ``abort()``, ``sha256``, ``bytes_written``):

* ``DirectSink`` (the converter's): the bytes are copied into page-aligned staging chunks, hashed,
  and written with ``O_DIRECT`` by a background thread, so they go from this process to the device
  without the page cache. Measured on the project's 2-CPU VM (2,000 ~50 KB JPEGs read, hashed and
  written, fsync at the end): 10–21 µs of system CPU per image against 18–113 µs for buffered writes,
  whose page-cache copies, dirty-page accounting and writeback (which an fsync or write-behind makes
  the writer pay itself) cost more than the device write. The thread only waits for the device, so
  the caller keeps computing meanwhile.
* ``BufferedSink``: plain ``writev`` through the page cache, for filesystems that refuse ``O_DIRECT``
  (tmpfs on older kernels, some network filesystems) and for callers that ask for it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

Buffer = bytes | bytearray | memoryview

CHUNK = 2 << 20
"""Bytes per direct write (one huge page): large enough that the per-write cost vanishes, small enough
that little is left to write when the shard ends. Converting 2,000 / 8,000 ~49 KB JPEGs with 2 workers
took 94 / 324 ms (best of 12 / 5) with 4 chunks of 2 MiB against 102 / 344 ms with 3 of 4 MiB, the
close of each shard waiting for up to 12 MiB of queued writes."""
CHUNKS = 4
"""Staging chunks per sink: one being filled, one being written, spares so a slow write does not stop
the caller at once."""
ALIGN = 4096
"""Alignment of staging memory and of every direct write but the last (page size: what every
filesystem that supports ``O_DIRECT`` accepts)."""


class Sink(Protocol):
    bytes_written: int

    @property
    def sha256(self) -> str: ...

    def write(self, buffers: Sequence[Buffer]) -> None: ...

    def space(self) -> memoryview | None:
        """Memory the caller may lay the next bytes out in directly (then ``commit`` them), or None."""
        ...

    def commit(self, size: int) -> None:
        """Take the first ``size`` bytes of the last ``space()`` as written."""
        ...

    def close(self, fsync: bool = True) -> None: ...

    def abort(self) -> None: ...


def open_sink(path: str | Path, direct: bool = True, write_behind: int | None = None) -> Sink:
    """A ``DirectSink`` when asked for and the filesystem allows ``O_DIRECT``, else a ``BufferedSink``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return DirectSink(os.open(path, flags | os.O_DIRECT, 0o644))
        except OSError:  # EINVAL: this filesystem does not do direct I/O
            pass
    return BufferedSink(os.open(path, flags, 0o644), write_behind)


class BufferedSink:
    """``writev`` through the page cache. With ``write_behind``, the kernel is asked every that many
    bytes to start writing the finished part to disk, so a final fsync has little left to wait for."""

    def __init__(self, fd: int, write_behind: int | None = None) -> None:
        self._fd = fd
        self._hash = hashlib.sha256()
        self.bytes_written = 0
        self._write_behind = write_behind
        self._flushed = 0

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, buffers: Sequence[Buffer]) -> None:
        update = self._hash.update
        for buffer in buffers:
            update(buffer)
        total = sum(len(b) for b in buffers)
        _write_all(self._fd, buffers, total)
        self.bytes_written += total
        if self._write_behind and self.bytes_written - self._flushed >= self._write_behind:
            _start_writeback(self._fd, self._flushed, self.bytes_written - self._flushed)
            self._flushed = self.bytes_written

    def space(self) -> memoryview | None:
        return None  # nothing to lay out into: writev takes the caller's buffers as they are

    def commit(self, size: int) -> None:
        if size:
            raise ValueError("a buffered sink offers no space to commit")

    def close(self, fsync: bool = True) -> None:
        try:
            if fsync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        os.close(self._fd)


def _write_all(fd: int, buffers: Sequence[Buffer], total: int) -> None:
    done = os.writev(fd, buffers)
    if done != total:  # a short write (signal, nearly full disk): finish it piece by piece
        rest = memoryview(b"".join(buffers))[done:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now (Linux starts the writeback of dirty pages
    on POSIX_FADV_DONTNEED, and drops the pages once clean: a converter's output need not stay cached)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        advise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class DirectSink:
    """Staging chunks filled and hashed by the caller, written with ``O_DIRECT`` by a background thread.

    The hash is computed by the caller when a chunk is full, not by the thread: measured with 2 workers
    on 2 CPUs, a thread that hashed and then waited for the device was the slower stage, and the
    workers' main threads sat waiting for free chunks with the CPUs idle 25% of the time. A write
    error in the thread (a full disk) is raised to the caller at its next ``write`` or at ``close``.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._hash = hashlib.sha256()
        self.bytes_written = 0
        # mmap memory is page-aligned, as O_DIRECT needs
        self._chunks = [_private_memory(CHUNK) for _ in range(CHUNKS)]
        self._free: queue.Queue[int] = queue.Queue()
        self._full: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._current = 0
        self._view = memoryview(self._chunks[0])
        self._filled = 0
        for number in range(1, CHUNKS):
            self._free.put(number)
        self._direct = True
        self._aborted = False
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
        self._thread.start()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, buffers: Sequence[Buffer]) -> None:
        for buffer in buffers:
            size = len(buffer)
            end = self._filled + size
            if end < CHUNK:  # the common case: it fits the current chunk
                self._view[self._filled : end] = buffer
                self._filled = end
            else:
                self._write_across(memoryview(buffer).cast("B"))
            self.bytes_written += size

    def space(self) -> memoryview:
        """The free rest of the chunk being filled: bytes laid out here skip the copy ``write`` makes."""
        return self._view[self._filled :]

    def commit(self, size: int) -> None:
        if not 0 <= size <= CHUNK - self._filled:
            raise ValueError(f"cannot commit {size} bytes: {CHUNK - self._filled} are free")
        self._filled += size
        self.bytes_written += size
        if self._filled == CHUNK:
            self._hand_over()

    def _write_across(self, data: memoryview) -> None:
        """Copy ``data`` in pieces, handing each chunk over as it fills."""
        while data:
            piece = data[: CHUNK - self._filled]
            self._view[self._filled : self._filled + len(piece)] = piece
            self._filled += len(piece)
            data = data[len(piece) :]
            if self._filled == CHUNK:
                self._hand_over()

    def _hand_over(self) -> None:
        """Hash the filled chunk, give it to the thread and continue in a free one."""
        self._hash.update(self._view[: self._filled])
        self._full.put((self._current, self._filled))
        self._current = self._free.get()
        self._raise_error()
        self._view = memoryview(self._chunks[self._current])
        self._filled = 0

    def _drain(self) -> None:
        while (item := self._full.get()) is not None:
            number, length = item
            try:
                if self._error is None and not self._aborted:
                    self._write_chunk(memoryview(self._chunks[number])[:length])
            except BaseException as error:  # reported to the caller; the thread keeps draining
                # without its traceback, whose frames hold views of the chunk (the chunk could not
                # be unmapped while the caller holds the error)
                self._error = error.with_traceback(None)
            self._free.put(number)

    def _write_chunk(self, data: memoryview) -> None:
        while data:
            if not self._direct:
                data = data[os.write(self._fd, data) :]
                continue
            # O_DIRECT takes whole pages; the archive's last bytes may not make one: written buffered
            aligned = len(data) - len(data) % ALIGN
            if not aligned:
                self._buffered_from_now()
                continue
            try:
                data = data[os.write(self._fd, data[:aligned]) :]
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self._buffered_from_now()  # refused after all: this file is written buffered

    def _buffered_from_now(self) -> None:
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct = False

    def _raise_error(self) -> None:
        """Raise the thread's write error; it stays set, so every later write or close fails too and
        the thread writes nothing more (a file with a hole must not look complete)."""
        if self._error is not None:
            raise self._error.with_traceback(None)

    def _stop_thread(self) -> None:
        self._full.put(None)
        self._thread.join()

    def close(self, fsync: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if self._filled:
            self._hash.update(self._view[: self._filled])
            self._full.put((self._current, self._filled))
        self._stop_thread()
        try:
            self._raise_error()
            if fsync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._release()

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._aborted = True
        self._stop_thread()
        os.close(self._fd)
        self._release()

    def _release(self) -> None:
        self._view.release()
        for chunk in self._chunks:
            with contextlib.suppress(BufferError):  # a view still held elsewhere: unmapped with it
                chunk.close()


def _private_memory(size: int) -> mmap.mmap:
    """Page-aligned private anonymous memory (``mmap(-1, …)`` alone maps shared memory, which costs a
    shmem page per first touch), backed by huge pages where the kernel offers them: a direct write
    pins its buffer's pages, and pinning two huge pages instead of 1,024 small ones took the CPU of a
    4 MiB direct write from 0.13–0.15 ms to 0.04–0.05 ms here."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    memory = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            memory.madvise(mmap.MADV_HUGEPAGE)
    return memory
