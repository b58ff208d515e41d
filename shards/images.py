"""Checking and preparing one input image: what goes into a sample's ``jpg`` component.

A JPEG whose pixels need no change is kept byte for byte (no generation loss, no decode cost); anything
else (PNG, BMP, CMYK JPEGs, images over ``max_side``) is decoded and re-encoded as an RGB JPEG. A bad
input raises ``BadInput`` with a reason that ends up in the manifest's ``skipped`` list.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from PIL import Image

from clusterssl.shards.jpeg import DEFAULT_MAX_PIXELS, SOI, ends_properly, pixel_limit_reason, walk_header

if TYPE_CHECKING:
    import numpy as np

CheckMode = Literal["cheap", "decode"]
CHECK_MODES: tuple[CheckMode, ...] = ("cheap", "decode")

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
"""File extensions (lower-cased) that sources treat as images."""

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
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    """Inputs whose header declares more pixels are skipped (decompression bombs); None: no limit."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """What is stored for one input: the ``jpg`` bytes and the image's size."""

    data: bytes
    width: int
    height: int


def is_image_file(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def prepare_jpeg(data: bytes, options: PrepareOptions) -> bytes:
    """The bytes to store as ``jpg`` for one input's encoded bytes; raises ``BadInput``."""
    return prepare_image(data, options).data


def prepare_image(data: bytes, options: PrepareOptions) -> Prepared:
    """The ``jpg`` to store for one input's encoded bytes, with its size; raises ``BadInput``.

    ``cheap`` check: non-empty, PIL identifies it from its header, its declared size is within
    ``max_pixels``, and a JPEG starts with SOI and ends with EOI. ``decode`` check: additionally decodes
    kept JPEGs (in PIL's draft mode, which still entropy-decodes every block but skips most of the
    inverse DCT, so truncation and broken data are still caught). Re-encoded inputs are always fully
    decoded.
    """
    if not data:
        raise BadInput("empty file")
    header = walk_header(data)
    if header.kept_as_is:
        # The common case, decided without PIL: an 8-bit Huffman-coded JPEG (baseline or progressive)
        # with 1 or 3 components whose segments are intact up to the start of the scan.
        if not ends_properly(data):
            raise BadInput("JPEG without an end-of-image marker (truncated?)")
        _check_pixels(header.width, header.height, options)
        if options.max_side is None or max(header.width, header.height) <= options.max_side:
            if options.check == "decode":
                image = _identify(data)
                image.draft(image.mode, (1, 1))
                _load(image)
            return Prepared(data, header.width, header.height)
    image = _identify(data)
    _check_pixels(*image.size, options)  # from the header: nothing is decoded yet
    is_jpeg = image.format == "JPEG"
    if is_jpeg and not data.startswith(SOI):
        raise BadInput("JPEG without a start-of-image marker")
    if is_jpeg and not ends_properly(data):
        raise BadInput("JPEG without an end-of-image marker (truncated?)")
    too_big = options.max_side is not None and max(image.size) > options.max_side
    if is_jpeg and image.mode in _MODES_KEPT_AS_IS and not too_big:
        if options.check == "decode":
            image.draft(image.mode, (1, 1))
            _load(image)
        return Prepared(data, *image.size)
    return _reencode(image, options)


def _check_pixels(width: int, height: int, options: PrepareOptions) -> None:
    reason = pixel_limit_reason(width, height, options.max_pixels)
    if reason:
        raise BadInput(f"{reason}; raise --max-pixels to accept it (with --max-side to store it smaller)")


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


def _reencode(image: Image.Image, options: PrepareOptions) -> Prepared:
    if options.max_side is not None and image.format == "JPEG":
        # Let libjpeg decode at a reduced scale when the target is much smaller (the result stays >= 2x
        # the target, so the final resize still has enough pixels to filter from).
        image.draft("RGB", (options.max_side * 2, options.max_side * 2))
    _load(image)
    rgb = to_rgb(image)
    if options.max_side is not None and max(rgb.size) > options.max_side:
        rgb.thumbnail((options.max_side, options.max_side), Image.Resampling.BICUBIC)
    return Prepared(encode_jpeg(rgb, options.jpeg_quality), *rgb.size)


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
