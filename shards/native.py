"""The converter's per-sample loop in C (``shards._packer``), used where it was built and applies.

The C loop reads the file, checks the JPEG and builds the five tar members and the index line, as the
Python loop does, but reads each image straight into the sink's staging memory. Measured with one worker
writing the same 1,000 ~49 KB JPEGs 12 times: 82 µs of CPU per image in Python, 61 with the C loop (the
rest is sha256 and the kernel's reads and writes). It takes the common input, a plain JPEG file stored
as it is, and hands every other input
(unreadable, empty, not a JPEG kept as is, one that changed size while read) back to the Python path,
which skips it with its reason or re-encodes it. Both paths write the same bytes
(``tests/test_shards_native.py``).

It applies when the source's inputs are plain files (``Source.file_root``), the check is ``cheap`` (the
``decode`` check needs PIL for every input), and file names are encoded as UTF-8 (how the C loop turns
references into paths). Without a compiler at install time the extension is missing and everything runs
in Python; ``CLUSTERSSL_NATIVE=0`` turns it off (to compare the two, or to rule it out).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

from clusterssl.shards.format import COMPONENT_ORDER
from clusterssl.shards.images import PrepareOptions
from clusterssl.shards.jpeg import LARGE_SIDE
from clusterssl.shards.tario import BLANK_HEADER

try:
    from clusterssl.shards import _packer
except ImportError:  # installed without a C compiler: the Python path does the same work
    _packer = None

PACK_BUDGET = 8 << 20
"""Without staging memory to pack into (the buffered sink), the most bytes one call returns (it stops
after the sample that reaches this): bounds a worker's memory however large the images are."""
ENVIRONMENT_SWITCH = "CLUSTERSSL_NATIVE"
JPEG_MAX_SIDE = 65535
"""A JPEG's width and height are 16-bit: a larger ``max_side`` is no limit."""


def native_available() -> bool:
    """Whether the C loop is built and not switched off with ``CLUSTERSSL_NATIVE=0``."""
    return _packer is not None and os.environ.get(ENVIRONMENT_SWITCH, "1") != "0"


def describe_loop() -> str:
    """Which per-sample loop converts files, and why, for reports (the benchmark prints it)."""
    if _packer is None:
        return "Python (shards._packer is not built)"
    if not native_available():
        return f"Python ({ENVIRONMENT_SWITCH}=0)"
    return "C (shards._packer)"


@dataclass(frozen=True)
class Packed:
    """What one call packed: ``len(lines)`` samples, whose tar bytes are the first ``used`` bytes of the
    target buffer followed by ``blob``, and their DALI index lines.

    ``refused`` means the input right after them is one the Python path must handle."""

    used: int
    blob: bytes
    lines: list[str]
    refused: bool


class FilePacker:
    """Packs runs of a shard's inputs, ``(ref, label, index)`` tuples naming files under ``root``."""

    def __init__(self, root: str, max_side: int | None) -> None:
        self._root = os.fsencode(root)
        self._max_side = _c_max_side(max_side)

    @classmethod
    def for_task(cls, root: str | None, options: PrepareOptions) -> FilePacker | None:
        """A packer when the C loop can do this conversion's work, else None (the Python path runs)."""
        utf8_names = (
            sys.getfilesystemencoding() == "utf-8" and sys.getfilesystemencodeerrors() == "surrogateescape"
        )
        if root is None or options.check != "cheap" or not utf8_names or not native_available():
            return None
        if options.max_side is not None and options.max_side < 1:
            return None  # not a size the C loop can compare with; the Python path says what it does
        return cls(root, native_side_bound(options))

    def pack(
        self,
        inputs: list[tuple[str, int, int]],
        start: int,
        stop: int,
        shard: int,
        position: int,
        offset: int,
        target: memoryview | None,
    ) -> Packed:
        """Pack ``inputs[start:stop]`` from the first one on; keys count from ``position`` in shard
        ``shard``, and the bytes will start at byte ``offset`` of the tar. Samples are laid out straight
        into ``target`` (the sink's staging memory: no copy) while they fit; the first one that does
        not comes back in ``blob`` and ends the call. Without a target, up to ``PACK_BUDGET`` bytes of
        samples come back in ``blob``."""
        assert _packer is not None
        used, blob, lines, refused = _packer.pack(
            self._root, inputs, start, stop, shard, position, offset, self._max_side, PACK_BUDGET, target,
            COMPONENT_ORDER, BLANK_HEADER,
        )  # fmt: skip
        return Packed(used, blob, lines, refused)


def native_side_bound(options: PrepareOptions) -> int:
    """The longest side the C loop may keep as it is: ``max_side``, and never above ``LARGE_SIDE`` nor
    the side of a square of ``max_pixels``. The C loop compares sides only, so every image that could
    break the pixel limit (whose longer side is then above ``isqrt(max_pixels)``), and every large one
    that ``shards info`` counts, goes back to the Python path, which decides and measures it."""
    bounds = [LARGE_SIDE]
    if options.max_side is not None:
        bounds.append(options.max_side)
    if options.max_pixels is not None:
        bounds.append(max(1, math.isqrt(options.max_pixels)))
    return min(bounds)


def jpeg_kept_as_is(data: bytes, max_side: int | None) -> bool:
    """The C loop's own JPEG decision (for tests that hold it against ``prepare_jpeg``)."""
    assert _packer is not None
    return bool(_packer.jpeg_kept_as_is(data, _c_max_side(max_side)))


def _c_max_side(max_side: int | None) -> int:
    """``max_side`` as the C loop takes it: 0 for no limit, and no more than a JPEG side can be (so it
    fits a C long)."""
    return 0 if max_side is None else min(max_side, JPEG_MAX_SIDE)
