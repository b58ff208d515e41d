"""Checking and preparing one input image: what goes into a sample's ``jpg`` component.

A JPEG whose pixels need no change is kept byte for byte (no generation loss, no decode cost); anything
else (PNG, BMP, CMYK JPEGs, images over ``max_side``) is decoded and re-encoded as an RGB JPEG. A bad
input raises ``BadInput`` with a reason that ends up in the manifest's ``skipped`` list.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from PIL import Image

if TYPE_CHECKING:
    import numpy as np

CheckMode = Literal["cheap", "decode"]
CHECK_MODES: tuple[CheckMode, ...] = ("cheap", "decode")

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
"""File extensions (lower-cased) that sources treat as images."""

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_TRAILING_PADDING = b"\0\r\n\t "
"""Bytes some writers append after the end-of-image marker; they do not make a JPEG truncated."""

_MODES_KEPT_AS_IS = frozenset({"RGB", "L"})
"""JPEG colour modes every downstream decoder reads alike; CMYK/YCCK JPEGs are re-encoded to RGB."""


class BadInput(Exception):
    """An input that cannot become a sample; ``str(error)`` is the reason recorded in the manifest."""


@dataclass(frozen=True)
class PrepareOptions:
    """How inputs are checked and (re-)encoded; part of the conversion's parameters."""

    check: CheckMode = "cheap"
    max_side: int | None = None
    jpeg_quality: int = 95


def is_image_file(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def jpeg_ends_properly(data: bytes) -> bool:
    """True when the last marker is EOI (``FF D9``), ignoring zero/whitespace padding after it.

    ``FF D9`` cannot occur inside entropy-coded data (a data ``FF`` is always followed by ``00`` or a
    restart marker), so a file cut short almost never ends with it.
    """
    return data.rstrip(_TRAILING_PADDING).endswith(_JPEG_EOI)


def prepare_jpeg(data: bytes, options: PrepareOptions) -> bytes:
    """The bytes to store as ``jpg`` for one input's encoded bytes; raises ``BadInput``.

    ``cheap`` check: non-empty, PIL identifies it from its header, and a JPEG starts with SOI and ends with
    EOI. ``decode`` check: additionally decodes kept JPEGs (in PIL's draft mode, which still entropy-decodes
    every block but skips most of the inverse DCT, so truncation and broken data are still caught).
    Re-encoded inputs are always fully decoded.
    """
    if not data:
        raise BadInput("empty file")
    frame = jpeg_frame(data)
    if frame is not None:
        # The common case, decided without PIL: an 8-bit Huffman-coded JPEG (baseline or progressive)
        # with 1 or 3 components whose segments are intact up to the start of the scan.
        if not jpeg_ends_properly(data):
            raise BadInput("JPEG without an end-of-image marker (truncated?)")
        width, height, _ = frame
        if options.max_side is None or max(width, height) <= options.max_side:
            if options.check == "decode":
                image = _identify(data)
                image.draft(image.mode, (1, 1))
                _load(image)
            return data
    image = _identify(data)
    is_jpeg = image.format == "JPEG"
    if is_jpeg and not data.startswith(_JPEG_SOI):
        raise BadInput("JPEG without a start-of-image marker")
    if is_jpeg and not jpeg_ends_properly(data):
        raise BadInput("JPEG without an end-of-image marker (truncated?)")
    too_big = options.max_side is not None and max(image.size) > options.max_side
    if is_jpeg and image.mode in _MODES_KEPT_AS_IS and not too_big:
        if options.check == "decode":
            image.draft(image.mode, (1, 1))
            _load(image)
        return data
    return _reencode(image, options)


_SOF_KEPT = frozenset({0xC0, 0xC1, 0xC2})
"""Frame types every JPEG decoder reads (baseline, extended and progressive Huffman). Lossless,
hierarchical and arithmetic-coded frames go the slow way (PIL), which re-encodes or rejects them."""
_SOF_ANY = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_SEGMENT_HEAD = struct.Struct(">BBH").unpack_from
"""``FF``, the marker and the segment length, read in one call (the walk runs once per input)."""
_FRAME_HEAD = struct.Struct(">BHHB").unpack_from
"""Precision, height, width and number of components at the start of a frame header."""


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` of a JPEG that can be stored as it is, else None.

    Walks the marker segments from SOI to the start of scan (what an "identify" reads) and accepts only
    an 8-bit frame of a type in ``_SOF_KEPT`` with 1 (grey) or 3 (colour) components; CMYK/YCCK, 12-bit,
    malformed and non-JPEG data return None and are left to PIL.
    """
    if not data.startswith(_JPEG_SOI):
        return None
    frame = None
    position, end = 2, len(data)
    while position + 4 <= end:
        fill, marker, length = _SEGMENT_HEAD(data, position)
        if fill != 0xFF:
            return None
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        if marker in (0xD8, 0xD9):
            return None
        if length < 2 or position + 2 + length > end:
            return None
        if marker in _SOF_ANY:
            if frame is not None or marker not in _SOF_KEPT or length < 8:
                return None
            precision, height, width, components = _FRAME_HEAD(data, position + 4)
            if precision != 8 or width == 0 or height == 0 or components not in (1, 3):
                return None
            frame = (width, height, components)
        elif marker == 0xDA:  # start of scan: the header is complete
            return frame
        position += 2 + length
    return None


def _identify(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    # Decoders raise many exception types on hostile bytes (OSError, SyntaxError, ValueError, struct.error,
    # DecompressionBombError…); every one of them means "this input cannot become a sample".
    except Exception as error:
        raise BadInput(f"not an image: {_describe(error)}") from None


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except Exception as error:  # see _identify: any decoder failure is a bad input
        raise BadInput(f"does not decode: {_describe(error)}") from None


def _reencode(image: Image.Image, options: PrepareOptions) -> bytes:
    if options.max_side is not None and image.format == "JPEG":
        # Let libjpeg decode at a reduced scale when the target is much smaller (the result stays >= 2x
        # the target, so the final resize still has enough pixels to filter from).
        image.draft("RGB", (options.max_side * 2, options.max_side * 2))
    _load(image)
    rgb = to_rgb(image)
    if options.max_side is not None and max(rgb.size) > options.max_side:
        rgb.thumbnail((options.max_side, options.max_side), Image.Resampling.BICUBIC)
    return encode_jpeg(rgb, options.jpeg_quality)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels; transparent areas become white (what viewers show), not the colour hidden under alpha."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit/float greyscale: scale to 8 bits by the image's own range instead of clipping at 255.
        import numpy as np  # only here and for digits: keeps worker start-up cheap

        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def render_digit(pixels: np.ndarray, size: int, quality: int) -> bytes:
    """One scikit-learn digit (8×8 values 0..16, ink high) as a ``size``×``size`` RGB JPEG.

    The 17 grey levels are stretched to 0..255 and upscaled bilinearly, so strokes stay smooth.
    """
    import numpy as np

    grey = (np.asarray(pixels, dtype=np.float64).reshape(8, 8) * (255.0 / 16.0)).round().astype(np.uint8)
    image = Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR)
    return encode_jpeg(image.convert("RGB"), quality)


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode a stored ``jpg`` component to RGB; raises ``BadInput`` when it does not decode."""
    image = _identify(data)
    _load(image)
    return to_rgb(image)


def _describe(error: BaseException) -> str:
    # PIL names the in-memory buffer ("<_io.BytesIO object at 0x7f…>"): an address, different every run,
    # that would make the manifest's skip reasons non-deterministic.
    message = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(error)).strip()
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
