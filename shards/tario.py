"""Writing tar shards and their DALI index files in one pass.

The writer lays members out itself (512-byte ustar headers, data padded to 512) so it knows every
component's offset as it writes: the DALI index is produced while writing, never by re-reading the tar.
Headers are deterministic (mtime 0, uid/gid 0, mode 0444), so the same samples always give the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

from clusterssl.shards.sink import DirectSink, open_sink

if TYPE_CHECKING:
    import numpy as np  # imported where runs are laid out: reading and verifying shards do without it

BLOCK = 512
_END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
_ZEROS = bytes(BLOCK)
DALI_INDEX_VERSION = "v1.2"


class IndexComponent(NamedTuple):
    """One member of a sample as DALI's index lists it: extension, data offset, data size, member name.

    A NamedTuple, not a dataclass: the writer makes five per sample, and this is ~5x cheaper to build.
    """

    ext: str
    offset: int
    size: int
    name: str


def _octal(value: int, width: int) -> bytes:
    """A ustar numeric field: zero-padded octal digits followed by a NUL."""
    digits = format(value, "o").encode("ascii")
    if len(digits) > width - 1:
        raise ValueError(f"value {value} does not fit a {width}-byte tar field")
    return digits.rjust(width - 1, b"0") + b"\0"


def _blank_header() -> bytes:
    """A ustar header with every constant field set and the name, size and checksum fields blank."""
    header = bytearray(BLOCK)
    header[100:108] = _octal(0o444, 8)  # mode
    header[108:116] = _octal(0, 8)  # uid
    header[116:124] = _octal(0, 8)  # gid
    header[136:148] = _octal(0, 12)  # mtime
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[156:157] = b"0"  # regular file
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    return bytes(header)


BLANK_HEADER = _blank_header()
_BLANK_HEADER_SUM = sum(BLANK_HEADER)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file ``name`` holding ``size`` bytes.

    Built from a precomputed blank header: only the name and size vary, so the checksum is the blank
    header's sum plus theirs (this runs five times per sample, so it is kept cheap).
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"member name longer than 100 bytes: {name!r}")
    size_field, size_sum = _size_field(size)
    header = bytearray(BLANK_HEADER)
    header[0 : len(encoded)] = encoded
    header[124:136] = size_field
    header[148:156] = b"%06o\0 " % (_BLANK_HEADER_SUM + sum(encoded) + size_sum)
    return bytes(header)


@functools.lru_cache(maxsize=1 << 16)
def _size_field(size: int) -> tuple[bytes, int]:
    """The 12-byte size field and its byte sum (sizes repeat a lot: every label and index is 8 bytes)."""
    field = _octal(size, 12)
    return field, sum(field)


class ShardTarWriter:
    """Appends samples to one tar file and records the DALI index entries of every component.

    >>> with ShardTarWriter(path) as w:
    ...     w.add_sample("s000000_000000", [("jpg", jpeg), ("cls", b"3")])
    ... w.write_dali_index(path.with_suffix(".idx"))

    ``sha256`` and ``bytes_written`` describe exactly the bytes written, available after ``close``.

    ``add_samples`` writes many samples at once, byte for byte what ``add_sample`` would write for each:
    the converter's path, where the per-sample cost is what matters (see ``_SampleRun``). ``direct``
    and ``write_behind`` choose how the bytes reach the disk (see ``shards.sink``).
    """

    LARGE = 4096
    """``add_sample`` hands payloads at least this big to the sink as they are instead of joining them."""

    def __init__(self, path: str | Path, write_behind: int | None = None, direct: bool = False) -> None:
        self.path = Path(path)
        self._sink = open_sink(self.path, direct=direct, write_behind=write_behind)
        self.count = 0
        """Samples written so far."""
        self._index_lines: list[str] = []
        self._closed = False

    @property
    def bytes_written(self) -> int:
        return self._sink.bytes_written

    @property
    def direct(self) -> bool:
        """Whether the bytes bypass the page cache (see ``shards.sink``)."""
        return isinstance(self._sink, DirectSink)

    def add_sample(self, key: str, components: Sequence[tuple[str, bytes]]) -> list[IndexComponent]:
        """Write one sample's members in the given order; returns their index entries."""
        _check_key(key)
        entries = []
        buffers: list[bytes] = []
        small: list[bytes] = []
        offset = self.bytes_written
        for ext, data in components:
            name = f"{key}.{ext}"
            size = len(data)
            small.append(ustar_header(name, size))
            entries.append(IndexComponent(ext, offset + BLOCK, size, name))
            if size >= self.LARGE:
                buffers.append(b"".join(small))
                buffers.append(data)
                small = []
            else:
                small.append(data)
            padding = -size % BLOCK
            if padding:
                small.append(_ZEROS[:padding])
            offset += BLOCK + size + padding
        if small:
            buffers.append(b"".join(small))
        self._sink.write(buffers)
        self._index_lines.append(dali_index_line(entries))
        self.count += 1
        return entries

    def add_samples(self, samples: Sequence[tuple[str, Sequence[tuple[str, bytes]]]]) -> None:
        """Write ``(key, components)`` samples in order: the same bytes and index as ``add_sample`` on
        each in turn. Consecutive samples with the same extensions whose components after the first each
        fit one 512-byte block (the converter's samples: an image, then label, index and source) are laid
        out together; any other sample goes through ``add_sample``."""
        layouts = [_run_layout(key, components) for key, components in samples]
        start = 0
        while start < len(samples):
            exts = layouts[start]
            if exts is None:
                self.add_sample(*samples[start])
                start += 1
                continue
            stop = start + 1
            while stop < len(samples) and stop - start < _SampleRun.MAX_SAMPLES and layouts[stop] == exts:
                stop += 1
            run = _SampleRun(samples[start:stop], exts, self.bytes_written)
            self._sink.write(run.buffers)
            self._index_lines.extend(run.index_lines())
            self.count += stop - start
            start = stop

    def packing_space(self) -> memoryview | None:
        """Where the next samples may be laid out in place (the sink's staging memory), or None."""
        return self._sink.space()

    def add_packed(self, used: int, blob: bytes, index_lines: list[str]) -> None:
        """Append ``len(index_lines)`` samples laid out elsewhere (the C loop of ``shards.native``): the
        first ``used`` bytes of the last ``packing_space()``, then ``blob``, laid out to start at
        ``bytes_written``; and their DALI index lines."""
        self._sink.commit(used)
        if blob:
            self._sink.write([blob])
        self._index_lines.extend(index_lines)
        self.count += len(index_lines)

    @property
    def sha256(self) -> str:
        return self._sink.sha256

    def close(self, fsync: bool = True) -> None:
        """Finish the archive; if that fails (a full disk, reported late by the direct sink), no partial
        file is left behind."""
        if self._closed:
            return
        try:
            self._sink.write([_END_OF_ARCHIVE])
        except BaseException:
            self.abort()
            raise
        self._closed = True
        try:
            self._sink.close(fsync)  # releases the sink's file and memory even when it raises
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        """Close without finishing the archive and delete the partial file."""
        if not self._closed:
            self._closed = True
            self._sink.abort()
        self.path.unlink(missing_ok=True)

    def write_dali_index(self, path: str | Path, fsync: bool = False) -> None:
        """Write the DALI index of the samples written so far (the text ``format_dali_index`` gives)."""
        _write_text(path, _index_text(self.count, self._index_lines), fsync)

    def __enter__(self) -> ShardTarWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_key(key: str) -> None:
    if "." in key or "/" in key:
        raise ValueError(f"sample keys may not contain dots or slashes: {key!r}")


def _run_layout(key: str, components: Sequence[tuple[str, bytes]]) -> tuple[str, ...] | None:
    """The extensions of a sample ``_SampleRun`` can lay out, or None when it needs ``add_sample``.

    Runs once per sample on the converter's path, hence the plain loops instead of generators."""
    _check_key(key)
    exts = tuple([ext for ext, _ in components])
    if not exts or not key.isascii() or len(key) + 1 + _longest_extension(exts) > 100:
        return None
    sizes = [len(data) for _, data in components[1:]]
    if sizes and (min(sizes) == 0 or max(sizes) > BLOCK):
        return None
    return exts


@functools.lru_cache(maxsize=64)
def _longest_extension(exts: tuple[str, ...]) -> int:
    """The longest extension's length, or 100 (no run possible) when one is not ASCII."""
    return max(len(ext) for ext in exts) if all(ext.isascii() for ext in exts) else 100


_MAX_SIZE = 8**11 - 1
"""The largest size an 11-digit ustar size field holds (8 GiB - 1)."""


class _SampleRun:
    """The bytes of consecutive samples with one layout, built together with numpy.

    Per sample, the first component (the image) may be any size; every later one fits one data block,
    so after the image's padding the sample always continues with ``2 × (m − 1)`` blocks. All headers are
    made at once (names, sizes and checksums as array operations), and the small members, the image's
    padding and the next sample's image header are laid out in one array, so the whole run goes to the
    sink as two buffers per sample: the image's bytes and the glue after them.
    """

    MAX_SAMPLES = 500
    """Two buffers per sample plus one must stay within the kernel's 1,024 buffers per writev (the
    buffered sink hands a run to one writev)."""

    def __init__(
        self, samples: Sequence[tuple[str, Sequence[tuple[str, bytes]]]], exts: tuple[str, ...], base: int
    ) -> None:
        import numpy as np

        n, m = len(samples), len(exts)
        self.keys = [key for key, _ in samples]
        self.exts = exts
        sizes = np.array([len(data) for _, components in samples for _, data in components], dtype=np.int64)
        self.sizes = sizes.reshape(n, m)
        if int(self.sizes[:, 0].max()) > _MAX_SIZE:
            raise ValueError(f"a member of {_MAX_SIZE + 1} bytes or more does not fit a ustar header")
        headers = self._headers(n, m)
        padding = -self.sizes[:, 0] % BLOCK
        # glue row i: [room for the image's padding][header + data block of components 1..m-1][header of
        # the image of sample i + 1]; the image's padding is the tail of the zeroed first block.
        width = BLOCK + (m - 1) * 2 * BLOCK + BLOCK
        glue = np.zeros((n, width), dtype=np.uint8)
        small = glue[:, BLOCK : width - BLOCK].reshape(n, m - 1, 2, BLOCK)
        small[:, :, 0] = headers[:, 1:]
        for j in range(1, m):
            column = np.array([components[j][1] for _, components in samples], dtype=f"S{BLOCK}")
            small[:, j - 1, 1] = column.view(np.uint8).reshape(n, BLOCK)
        glue[:-1, width - BLOCK :] = headers[1:, 0]
        flat = memoryview(glue.reshape(-1))
        self.buffers: list[bytes | memoryview] = [memoryview(headers[0, 0])]
        starts = (np.arange(n) * width + BLOCK - padding).tolist()
        for i, (_, components) in enumerate(samples):
            self.buffers.append(components[0][1])
            self.buffers.append(flat[starts[i] : (i + 1) * width - (BLOCK if i == n - 1 else 0)])
        # data offsets: the image right after its header, then one header block before each small member
        sample_bytes = BLOCK + self.sizes[:, 0] + padding + (m - 1) * 2 * BLOCK
        sample_start = base + np.concatenate(([0], np.cumsum(sample_bytes)[:-1]))
        offsets = np.empty((n, m), dtype=np.int64)
        offsets[:, 0] = sample_start + BLOCK
        after_image = sample_start + BLOCK + self.sizes[:, 0] + padding
        offsets[:, 1:] = after_image[:, None] + np.arange(m - 1) * 2 * BLOCK + BLOCK
        self.offsets = offsets

    def _headers(self, n: int, m: int) -> np.ndarray:
        """The ``(n, m, 512)`` ustar headers of every member."""
        import numpy as np

        octal_shifts_11 = np.arange(30, -1, -3, dtype=np.int64)
        octal_shifts_6 = np.arange(15, -1, -3, dtype=np.int64)
        headers = np.empty((n, m, BLOCK), dtype=np.uint8)
        headers[:] = np.frombuffer(BLANK_HEADER, dtype=np.uint8)
        names = np.array([f"{key}.{ext}" for key in self.keys for ext in self.exts], dtype="S100")
        name_bytes = names.view(np.uint8).reshape(n, m, 100)
        headers[:, :, :100] = name_bytes
        size_field = ((self.sizes[:, :, None] >> octal_shifts_11) & 7) + ord("0")
        headers[:, :, 124:135] = size_field
        # the checksum is the byte sum with its own field as spaces: the blank header's sum (spaces
        # there, zeros where name and size go) plus the name and size bytes
        checksum = _BLANK_HEADER_SUM + name_bytes.sum(axis=2, dtype=np.int64) + size_field.sum(axis=2)
        headers[:, :, 148:154] = ((checksum[:, :, None] >> octal_shifts_6) & 7) + ord("0")
        headers[:, :, 154] = 0
        headers[:, :, 155] = ord(" ")
        return headers

    def index_lines(self) -> list[str]:
        """The DALI index line of every sample (the text ``dali_index_line`` gives)."""
        template = " ".join(
            f"{ext} {{{1 + 2 * j}}} {{{2 + 2 * j}}} {{0}}.{ext}" for j, ext in enumerate(self.exts)
        )
        import numpy as np

        fields = np.stack([self.offsets, self.sizes], axis=2).reshape(len(self.keys), -1).tolist()
        return [template.format(key, *row) for key, row in zip(self.keys, fields, strict=True)]


def dali_index_line(components: Sequence[IndexComponent]) -> str:
    """One sample's line of a DALI webdataset index: ``ext offset size name`` per component."""
    return " ".join(f"{c.ext} {c.offset} {c.size} {c.name}" for c in components)


def format_dali_index(samples: Sequence[Sequence[IndexComponent]]) -> str:
    """The text of a DALI webdataset index (the ``v1.2`` format ``wds2idx`` writes)."""
    return _index_text(len(samples), [dali_index_line(components) for components in samples])


def _index_text(count: int, lines: list[str]) -> str:
    return f"{DALI_INDEX_VERSION} {count}\n" + "".join(line + "\n" for line in lines)


def _write_text(path: str | Path, text: str, fsync: bool) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())


def parse_dali_index(text: str) -> list[list[IndexComponent]]:
    """Parse the text of a ``v1.2`` DALI index; raises ValueError on anything malformed."""
    lines = text.splitlines()
    if not lines:
        raise ValueError("empty index file")
    head = lines[0].split()
    if len(head) != 2 or head[0] != DALI_INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"index header is not '{DALI_INDEX_VERSION} <count>': {lines[0]!r}")
    count = int(head[1])
    body = [line for line in lines[1:] if line.strip()]
    if len(body) != count:
        raise ValueError(f"index header says {count} samples, body has {len(body)}")
    samples = []
    for line in body:
        fields = line.split()
        if len(fields) % 4:
            raise ValueError(f"index line does not hold groups of 4 fields: {line!r}")
        samples.append(
            [
                IndexComponent(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                for i in range(0, len(fields), 4)
            ]
        )
    return samples


def read_dali_index(path: str | Path) -> list[list[IndexComponent]]:
    return parse_dali_index(Path(path).read_text(encoding="utf-8"))


def sample_components(samples: Iterable[Sequence[IndexComponent]], ext: str) -> list[IndexComponent]:
    """The component with extension ``ext`` of every sample (KeyError naming the sample if one lacks it)."""
    found = []
    for components in samples:
        match = next((c for c in components if c.ext == ext), None)
        if match is None:
            raise KeyError(f"sample {components[0].name.split('.')[0]!r} has no {ext!r} component")
        found.append(match)
    return found


REGULAR_FILE_TYPES = (b"0", b"\0")
"""ustar type flags of a regular file (NUL is the pre-POSIX spelling)."""


@dataclass(frozen=True)
class TarMember:
    """A member as its ustar header describes it: name, type flag, where its data starts, its size."""

    name: str
    type: bytes
    offset: int
    size: int


def read_tar_members(handle: BinaryIO) -> list[TarMember]:
    """Walk the headers of a tar file (plain ustar, as ``ShardTarWriter`` writes), seeking over the data.

    Raises ValueError on a bad header checksum, a member running past the end of the file, or a missing
    end-of-archive marker, so a truncated or tampered tar is reported, never half-read.
    """
    handle.seek(0, os.SEEK_END)
    end = handle.tell()
    members = []
    position = 0
    while True:
        handle.seek(position)
        header = handle.read(BLOCK)
        if len(header) < BLOCK:
            raise ValueError(f"file ends at byte {end} before the end-of-archive marker (truncated?)")
        if header == b"\0" * BLOCK:
            return members
        stored = header[148:156]
        expected = sum(header[:148]) + 8 * 0x20 + sum(header[156:])
        try:
            if int(stored.rstrip(b"\0 ").decode("ascii") or "-1", 8) != expected:
                raise ValueError
            size = int(header[124:136].rstrip(b"\0 ").decode("ascii") or "0", 8)
        except ValueError:
            raise ValueError(f"bad tar header at byte {position}") from None
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if prefix:
            name = f"{prefix}/{name}"
        data_offset = position + BLOCK
        if data_offset + size > end:
            raise ValueError(f"member {name!r} runs past the end of the file (truncated?)")
        members.append(TarMember(name, header[156:157], data_offset, size))
        position = data_offset + -(-size // BLOCK) * BLOCK


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class TruncatedSample(ValueError):
    """A sample's component ends past the end of its tar (the file was cut short)."""


def read_indexed_sample(
    fd: int, components: Sequence[IndexComponent], file_size: int, exts: Iterable[str] | None = None
) -> dict[str, bytes]:
    """The bytes of one sample's components (all, or those in ``exts``) by the DALI index offsets: one
    ``pread`` each, so any number of threads or processes can share ``fd``.

    Raises TruncatedSample when a component would run past ``file_size``.
    """
    wanted = None if exts is None else set(exts)
    found = {}
    for entry in components:
        if wanted is not None and entry.ext not in wanted:
            continue
        if entry.offset + entry.size > file_size:
            raise TruncatedSample(
                f"{entry.name} ends at byte {entry.offset + entry.size}, the tar has {file_size}"
            )
        found[entry.ext] = os.pread(fd, entry.size, entry.offset)
    return found
