"""The shard sinks: direct and buffered writes give the same file and hash; errors and fallbacks."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

from clusterssl.shards import sink as sink_module
from clusterssl.shards.sink import CHUNK, CHUNKS, BufferedSink, DirectSink, open_sink
from clusterssl.shards.tario import ShardTarWriter


def _pieces() -> list[bytes]:
    """Writes of every awkward size: tiny, page-sized, across a chunk boundary, a whole chunk and more,
    ending on a length that is not a whole page."""
    rng = random.Random(5)
    sizes = [1, 511, 4096, 70_000, CHUNK - 70_000, 3, CHUNK, 2 * CHUNK + 17, 5000, 1024]
    return [rng.randbytes(size) for size in sizes]


def _direct_io_works(directory: Path) -> bool:
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("direct", [True, False])
def test_sinks_write_every_byte_in_order_and_hash_them(tmp_path: Path, direct: bool) -> None:
    if direct and not _direct_io_works(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    pieces = _pieces()
    sink = open_sink(tmp_path / "out", direct=direct, write_behind=1 << 20)
    assert isinstance(sink, DirectSink if direct else BufferedSink)
    for start in range(0, len(pieces), 3):
        sink.write([memoryview(p) if i % 2 else p for i, p in enumerate(pieces[start : start + 3])])
    sink.close(fsync=True)
    expected = b"".join(pieces)
    assert (tmp_path / "out").read_bytes() == expected
    assert sink.sha256 == hashlib.sha256(expected).hexdigest()
    assert sink.bytes_written == len(expected)


def test_bytes_laid_out_in_the_staging_space_mix_with_writes(tmp_path: Path) -> None:
    """``space``/``commit`` (the C loop's way in) and ``write`` interleave into one ordered, hashed file,
    a commit that fills the chunk hands it over, and a commit beyond the free space is refused."""
    if not _direct_io_works(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    rng = random.Random(9)
    sink = open_sink(tmp_path / "out", direct=True)
    expected = bytearray()
    for piece_size in [100, CHUNK // 2, 0, 3000, CHUNK, 77, 5]:
        space = sink.space()
        assert space is not None and len(space) == CHUNK - sink.bytes_written % CHUNK
        laid_out = rng.randbytes(min(piece_size, len(space)))
        space[: len(laid_out)] = laid_out
        del space
        sink.commit(len(laid_out))
        written = rng.randbytes(piece_size // 3)
        sink.write([written])
        expected += laid_out + written
    with pytest.raises(ValueError, match="cannot commit"):
        sink.commit(CHUNK)
    sink.close(fsync=False)
    assert (tmp_path / "out").read_bytes() == expected
    assert sink.sha256 == hashlib.sha256(expected).hexdigest() and sink.bytes_written == len(expected)

    buffered = open_sink(tmp_path / "buffered", direct=False)
    assert buffered.space() is None
    buffered.commit(0)
    with pytest.raises(ValueError):
        buffered.commit(1)
    buffered.close(fsync=False)


def test_a_write_error_in_the_writer_thread_reaches_the_caller() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    sink = DirectSink(os.open("/dev/full", os.O_WRONLY))
    try:
        with pytest.raises(OSError) as raised:
            for _ in range(2 * CHUNKS):  # a later hand-over sees the first chunk's failure
                sink.write([bytes(CHUNK)])
        assert raised.value.errno == errno.ENOSPC
        with pytest.raises(OSError, match="No space"):
            sink.write([bytes(CHUNK)])  # the failure stays: nothing more is written
    finally:
        sink.abort()  # ends the writer thread


def test_a_filesystem_without_direct_io_gets_a_buffered_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refuse_direct(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(sink_module.os, "open", refuse_direct)
    with ShardTarWriter(tmp_path / "a.tar", direct=True) as writer:
        writer.add_sample("k", [("jpg", b"abc")])
    assert not writer.direct
    assert (tmp_path / "a.tar").stat().st_size == 512 + 512 + 1024  # header, data, end of archive


def test_direct_writes_refused_midway_continue_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _direct_io_works(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    real_write = os.write
    refused = []

    def refuse_direct_writes(fd: int, data: object) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(sink_module.os, "write", refuse_direct_writes)
    pieces = _pieces()
    sink = open_sink(tmp_path / "out", direct=True)
    sink.write(pieces)
    sink.close()
    assert refused, "the direct write was attempted"
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)


def test_an_aborted_direct_writer_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardTarWriter(tmp_path / "a.tar", direct=True) as writer:
        writer.add_sample("k", [("jpg", bytes(3 * CHUNK))])
        raise RuntimeError("interrupted")
    assert not (tmp_path / "a.tar").exists()


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("direct", [True, False])
def test_a_failure_finishing_the_archive_leaves_no_file_and_no_writer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    writer = ShardTarWriter(tmp_path / "a.tar", direct=direct)
    writer.add_sample("k", [("jpg", b"abc")])
    monkeypatch.setattr(DirectSink, "write", _disk_full)  # the end-of-archive blocks cannot be written
    monkeypatch.setattr(BufferedSink, "write", _disk_full)
    with pytest.raises(OSError, match="No space"):
        writer.close()
    assert not (tmp_path / "a.tar").exists()
    assert "shard-writer" not in [thread.name for thread in threading.enumerate()]


@pytest.mark.parametrize("direct", [True, False])
def test_a_failed_sync_at_close_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    def sync_fails(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    writer = ShardTarWriter(tmp_path / "a.tar", direct=direct)
    writer.add_sample("k", [("jpg", b"abc")])
    monkeypatch.setattr(sink_module.os, "fsync", sync_fails)
    with pytest.raises(OSError, match="Input/output"):
        writer.close()
    monkeypatch.undo()
    assert not (tmp_path / "a.tar").exists()
    writer.abort()  # after a failed close: nothing left to release, no error
