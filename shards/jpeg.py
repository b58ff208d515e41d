"""The JPEG header walk shared by the converter and the loader, and the pixel limit both enforce.

One walk over the marker segments from SOI to the start of scan (what a decoder's "identify" step reads)
answers both questions asked of a JPEG before it is decoded:

* the converter (``shards.images``): can these bytes be stored as they are? (a structurally sound header,
  plus a frame every decoder reads alike: ``JpegHeader.kept_as_is``);
* the loader (``pipeline.data.integrity``): will a decoder trip on this sample? (a sound header, an
  end-of-image marker, and a declared size under the pixel limit).

The C loop of the converter (``shards/_packer.c``) restates the converter's decision for speed; the tests
hold it against this module byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
TRAILING_PADDING = b"\0\r\n\t "
"""Bytes some writers append after the end-of-image marker; they do not make a JPEG truncated."""

DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
"""Pillow's ``Image.MAX_IMAGE_PIXELS`` (89,478,485, about 9459²): above it an image is treated as a
decompression bomb. A few hundred bytes can declare 60000×60000 pixels, which a decoder would allocate
(10.8 GB) before finding out that the data is missing."""

LARGE_SIDE = 4096
"""A side above this is worth telling the user about (``shards info``): decoding such images every epoch
costs far more than the crops a training uses."""

SOF_KEPT = frozenset({0xC0, 0xC1, 0xC2})
"""Frame types every JPEG decoder reads (baseline, extended and progressive Huffman). Lossless,
hierarchical and arithmetic-coded frames are left to PIL, which re-encodes or rejects them."""
SOF_ANY = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
"""Start-of-frame markers (C4, C8 and CC in that range are DHT, JPG and DAC)."""
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
"""Markers without a length field (TEM and the restart markers)."""
SOS = 0xDA

_SEGMENT_HEAD = struct.Struct(">BBH").unpack_from
"""``FF``, the marker and the segment length, read in one call (the walk runs once per input)."""
_FRAME_HEAD = struct.Struct(">BHHB").unpack_from
"""Precision, height, width and number of components at the start of a frame header."""


@dataclass(frozen=True, slots=True)
class JpegHeader:
    """What the header walk found. ``ok`` False: ``reason`` says why; ``needs`` > 0 when the bytes given
    ended before the header did (the caller reads at least ``needs`` bytes and walks again)."""

    ok: bool
    reason: str = ""
    width: int = 0
    height: int = 0
    components: int = 0
    precision: int = 0
    frame_marker: int = 0
    header_end: int = 0
    """Bytes up to and including the start-of-scan segment."""
    needs: int = 0

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def kept_as_is(self) -> bool:
        """An 8-bit Huffman-coded frame with 1 (grey) or 3 (colour) components: one every decoder reads
        alike (CMYK/YCCK and 12-bit JPEGs are re-encoded)."""
        return self.ok and self.frame_marker in SOF_KEPT and self.precision == 8 and self.components in (1, 3)


def _bad(reason: str) -> JpegHeader:
    return JpegHeader(False, reason)


def walk_header(head: bytes, size: int | None = None) -> JpegHeader:
    """Walk the header of a JPEG of ``size`` bytes (default ``len(head)``) whose first bytes are ``head``.

    Sound means: SOI first; segments whose lengths stay inside the file; exactly one frame header, with
    a non-zero size, before the first scan; no second SOI and no EOI before the scan.
    """
    size = len(head) if size is None else size
    if size < 4 or not head.startswith(SOI):
        return _bad("not a JPEG (no start-of-image marker)")
    frame: tuple[int, int, int, int, int] | None = None
    position = 2
    while True:
        if position + 4 > size:
            return _bad("truncated JPEG header")
        if position + 4 > len(head):
            return JpegHeader(False, "header longer than what was read", needs=position + 4)
        fill, marker, length = _SEGMENT_HEAD(head, position)
        if fill != 0xFF:
            return _bad(f"bad JPEG marker at byte {position}")
        if marker == 0xFF:  # a fill byte before a marker
            position += 1
            continue
        if marker in STANDALONE:
            position += 2
            continue
        if marker == 0xD9:
            return _bad("end-of-image before any image data")
        if marker == 0xD8:
            return _bad("a second start-of-image marker")
        end = position + 2 + length
        if length < 2 or end > size:
            return _bad("truncated JPEG header")
        if end > len(head):
            return JpegHeader(False, "header longer than what was read", needs=end)
        if marker in SOF_ANY:
            if frame is not None:
                return _bad("two frame headers")
            if length < 8:
                return _bad("short frame header")
            precision, height, width, components = _FRAME_HEAD(head, position + 4)
            if width == 0 or height == 0:
                return _bad(f"frame header gives size {width}x{height}")
            frame = (marker, precision, width, height, components)
        elif marker == SOS:
            if frame is None:
                return _bad("scan before any frame header")
            marker, precision, width, height, components = frame
            return JpegHeader(True, "", width, height, components, precision, marker, end)
        position = end


def ends_properly(data: bytes) -> bool:
    """True when the last marker is EOI (``FF D9``), ignoring zero/whitespace padding after it.

    ``FF D9`` cannot occur inside entropy-coded data (a data ``FF`` is always followed by ``00`` or a
    restart marker), so a file cut short almost never ends with it.
    """
    return data.rstrip(TRAILING_PADDING).endswith(EOI)


def pixel_limit_reason(width: int, height: int, max_pixels: int | None) -> str:
    """Why an image of ``width``×``height`` must not be decoded, or '' when it is within the limit."""
    if max_pixels is None or width * height <= max_pixels:
        return ""
    return (
        f"{width}x{height} pixels ({width * height / 1e6:.1f} MP) is above the limit of "
        f"{max_pixels / 1e6:.1f} MP (a decompression bomb, or an image too large to decode every epoch)"
    )
