"""Shared fixtures (and, for every test, temporary files kept under pytest's own temporary root).

``digits16``: the built-in digits at 16 px (``train/`` and ``val/`` shard sets), converted once per test run.

``sequential_bank``: the reference feature store of the 16-px digits (``extraction_helpers``'s tiny
module, one process, no worker, shards and samples in stored order).

``image_folder``: a tiny ImageFolder tree, for any test that needs real image files to convert or load.

    <tmp>/images/
        bird/   00.jpg 01.jpg 02.JPG "a.b c.jpg" 04.png
        cat/    00.jpg 01.jpg 02.JPG "a.b c.jpg" 04.png
        dog/    00.jpg 01.jpg 02.JPG "a.b c.jpg" 04.png

15 images of 24×20 pixels (seeded noise, so every file's bytes differ), class ids 0, 1, 2 in sorted order.
The JPEGs are RGB noise; the PNGs are RGBA gradients with varying alpha (the converter re-encodes them). The names cover an upper-case
extension and a name with dots and spaces. ``ImageFolder.inputs`` maps each file's path relative to the
root (the converter's reference, e.g. ``"cat/a.b c.jpg"``) to its label and bytes. Building it takes a
few milliseconds; tests may add or corrupt files in ``root`` freely (each test gets its own copy).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from clusterssl.pipeline.features.store import FeatureStore

CLASSES = ("bird", "cat", "dog")
JPEG_NAMES = ("00.jpg", "01.jpg", "02.JPG", "a.b c.jpg")
PNG_NAMES = ("04.png",)
IMAGE_SIZE = (24, 20)


@dataclass(frozen=True)
class InputImage:
    label: int
    data: bytes
    is_jpeg: bool


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    classes: tuple[str, ...]
    inputs: dict[str, InputImage]
    """Path relative to ``root`` (posix) → label and file bytes."""


def noise_image(
    rng: np.random.Generator, size: tuple[int, int] = IMAGE_SIZE, mode: str = "RGB"
) -> Image.Image:
    """A ``size`` (width, height) image of uniform noise in ``mode`` (RGB or RGBA)."""
    pixels = rng.integers(0, 256, size=(size[1], size[0], len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels)  # (h, w, 3) uint8 is RGB, (h, w, 4) is RGBA


def smooth_image(
    rng: np.random.Generator, size: tuple[int, int] = IMAGE_SIZE, mode: str = "RGB"
) -> Image.Image:
    """Random linear gradients per channel (survive JPEG almost unchanged, unlike noise); RGBA: alpha ramp."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    channels = [
        np.clip(a + b * x / size[0] + c * y / size[1], 0, 255)
        for a, b, c in rng.uniform([0, -120, -120], [255, 120, 120], size=(len(mode), 3))
    ]
    if mode == "RGBA":  # alpha from 0 (left) to opaque (right), so transparency handling shows
        channels[-1] = 255.0 * x / (size[0] - 1)
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def jpeg_bytes(rng: np.random.Generator, size: tuple[int, int] = IMAGE_SIZE) -> bytes:
    return encode(noise_image(rng, size), "JPEG", quality=90)


def with_declared_size(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its frame header claiming ``width``×``height``: a decompression bomb when large (the
    markers stay intact, so only the declared size gives it away)."""
    sof = min(at for marker in (b"\xff\xc0", b"\xff\xc2") if (at := jpeg.find(marker)) > 0)
    patched = bytearray(jpeg)
    patched[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(patched)


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_under_pytest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The temporary files of the code under test and of the processes it starts (torchrun's agent
    folders, MLflow's lock files, torch.compile's kernels) go under pytest's own temporary root, which
    pytest prunes, instead of piling up in the system's temporary directory run after run."""
    directory = tmp_path_factory.mktemp("tmpdir")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(directory))
        patch.setattr(tempfile, "tempdir", str(directory))
        # importing torch's compiler (at collection, with the trainer) already fixed this one in the
        # environment, under the system's temporary directory
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(directory / "torchinductor"))
        yield


@pytest.fixture
def image_folder(tmp_path: Path) -> ImageFolder:
    rng = np.random.default_rng(1234)
    root = tmp_path / "images"
    inputs = {}
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for file in JPEG_NAMES:
            inputs[f"{name}/{file}"] = InputImage(label, jpeg_bytes(rng), True)
        for file in PNG_NAMES:
            png = encode(smooth_image(rng, mode="RGBA"), "PNG")
            inputs[f"{name}/{file}"] = InputImage(label, png, False)
    for ref, image in inputs.items():
        (root / ref).write_bytes(image.data)
    return ImageFolder(root, CLASSES, inputs)


@pytest.fixture(scope="session")
def digits16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer_helpers import digits_dir

    return digits_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def sequential_bank(digits16: Path) -> FeatureStore:
    from extraction_helpers import run_extraction, tiny_module

    return run_extraction(digits16 / "train", tiny_module(), num_workers=0, shuffle=False)
