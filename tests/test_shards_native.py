"""The converter's C loop (``shards._packer``) writes exactly what the Python path writes.

Every conversion here runs twice, with ``CLUSTERSSL_NATIVE=0`` and ``=1``, and every file the two write
(tars, DALI indexes, manifest) must be equal byte for byte, over inputs the C loop packs and inputs it
hands back to the Python path (skipped, re-encoded, too long a name), with staging chunks small enough
that samples keep spilling over chunk ends, and through the buffered sink, which offers no staging.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import ImageFolder, encode, jpeg_bytes, noise_image, smooth_image
from PIL import Image

from clusterssl.shards import native, sink
from clusterssl.shards.convert import ConvertOptions, convert
from clusterssl.shards.format import COMPONENT_ORDER
from clusterssl.shards.images import PrepareOptions, prepare_jpeg
from clusterssl.shards.jpeg import ends_properly, walk_header
from clusterssl.shards.manifest import load_manifest
from clusterssl.shards.sources import ImageFolderSource, ListSource, Source
from clusterssl.shards.tario import BLANK_HEADER


@pytest.fixture(autouse=True)
def native_built() -> None:
    if native._packer is not None:
        return
    reason = "clusterssl.shards._packer is not built (no C compiler when the project was installed)"
    if os.environ.get("CLUSTERSSL_REQUIRE_NATIVE") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def padded_to(data: bytes, remainder: int) -> bytes:
    """``data`` with NULs after its end marker (still kept as is) up to a size ≡ ``remainder`` mod 512."""
    return data + b"\0" * ((remainder - len(data)) % 512)


@pytest.fixture
def awkward_folder(image_folder: ImageFolder) -> Path:
    """The shared folder plus inputs at every edge of the C loop's work."""
    rng = np.random.default_rng(8)
    root = image_folder.root
    base = jpeg_bytes(rng)
    files = {
        # member sizes around the 512-byte blocks
        "cat/block0.jpg": padded_to(base, 0),
        "cat/block1.jpg": padded_to(base, 1),
        "cat/block511.jpg": padded_to(base, 511),
        # larger than the small staging chunks below (~150 KB of noise)
        "dog/large.jpg": encode(noise_image(rng, (300, 200)), "JPEG", quality=95),
        "dog/progressive.jpg": encode(smooth_image(rng, (90, 70)), "JPEG", progressive=True),
        "dog/grey.jpg": encode(smooth_image(rng, (40, 30)).convert("L"), "JPEG"),
        # handed back to the Python path: re-encoded, skipped
        "bird/cmyk.jpg": encode(smooth_image(rng, (30, 20)).convert("CMYK"), "JPEG"),
        "bird/truncated.jpg": base[: len(base) // 2],
        "bird/empty.jpg": b"",
        "bird/text.jpg": b"not an image at all",
    }
    for ref, data in files.items():
        (root / ref).write_bytes(data)
    (root / "bird" / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    # a file name that is not UTF-8 (the reference carries it with surrogateescape)
    with open(os.path.join(os.fsencode(root / "cat"), b"\xff\xfename.jpg"), "wb") as handle:
        handle.write(jpeg_bytes(rng))
    # a reference longer than one tar block: its src member needs the general layout
    deep = root / "dog" / ("d" * 200) / ("e" * 200)
    deep.mkdir(parents=True)
    (deep / ("f" * 150 + ".jpg")).write_bytes(jpeg_bytes(rng))
    return root


def convert_both(
    source: Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: ConvertOptions
) -> tuple[Path, Path, list[bool]]:
    """Convert with the Python path, then with the C loop; returns both outputs and, per call of the
    C loop, whether it was given staging memory to lay samples out in. Checks that the first run did
    not use the C loop and that the second packed most samples with it."""
    targets: list[bool] = []
    packed: list[int] = []
    original = native.FilePacker.pack

    def recording(self, inputs, start, stop, shard, position, offset, target):  # type: ignore[no-untyped-def]
        targets.append(target is not None)
        result = original(self, inputs, start, stop, shard, position, offset, target)
        packed.append(len(result.lines))
        return result

    monkeypatch.setattr(native.FilePacker, "pack", recording)
    outputs = []
    for switch in ("0", "1"):
        monkeypatch.setenv(native.ENVIRONMENT_SWITCH, switch)
        out = tmp_path / f"out-native-{switch}"
        convert(source, out, options)
        outputs.append(out)
        if switch == "0":  # else both outputs could come from the C loop and agree trivially
            assert not packed, "the switch did not turn the C loop off"
    assert sum(packed) > load_manifest(outputs[1]).count / 2, "the C loop packed too few samples"
    return outputs[0], outputs[1], targets


def assert_same_files(python_out: Path, native_out: Path) -> None:
    names = sorted(p.name for p in python_out.iterdir())
    assert names == sorted(p.name for p in native_out.iterdir())
    assert any(name.endswith(".tar") for name in names)
    for name in names:
        assert (python_out / name).read_bytes() == (native_out / name).read_bytes(), name


def test_native_loop_writes_the_python_paths_bytes(
    awkward_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python_out, native_out, targets = convert_both(
        ImageFolderSource(awkward_folder), tmp_path, monkeypatch, ConvertOptions(samples_per_shard=7)
    )
    assert targets, "the C loop never ran"
    assert_same_files(python_out, native_out)
    manifest = load_manifest(native_out)
    reasons = {s.input.rsplit("/", 1)[-1]: s.reason for s in manifest.skipped}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "text.jpg", "dangling.jpg"}
    assert manifest.count == 15 + 6 + 1 + 1 + 1  # fixture + kept/re-encoded + non-UTF-8 name + deep path


def test_native_loop_across_small_staging_chunks(
    awkward_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 8 KiB: nearly every sample spills over a chunk's end (and the large image over many)."""
    monkeypatch.setattr(sink, "CHUNK", 8192)
    python_out, native_out, targets = convert_both(
        ImageFolderSource(awkward_folder), tmp_path, monkeypatch, ConvertOptions(samples_per_shard=9)
    )
    if not any(targets):
        pytest.skip("this filesystem refuses O_DIRECT: no staging memory to lay samples out in")
    assert_same_files(python_out, native_out)


@pytest.mark.parametrize("budget", [1, 40_000])
def test_native_loop_through_the_buffered_sink(
    awkward_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    """No staging memory: samples come back as bytes, one per call (budget 1) or a few."""
    monkeypatch.setattr(native, "PACK_BUDGET", budget)
    real_open_sink = sink.open_sink
    monkeypatch.setattr(
        "clusterssl.shards.tario.open_sink",
        lambda path, direct, write_behind: real_open_sink(path, False, write_behind),
    )
    python_out, native_out, targets = convert_both(
        ImageFolderSource(awkward_folder), tmp_path, monkeypatch, ConvertOptions(samples_per_shard=8)
    )
    assert targets and not any(targets)
    assert_same_files(python_out, native_out)


def test_native_loop_with_max_side_and_a_list(
    image_folder: ImageFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list with relative and absolute paths; images over ``max_side`` go back to be re-encoded."""
    rng = np.random.default_rng(4)
    (image_folder.root / "big.jpg").write_bytes(encode(smooth_image(rng, (64, 48)), "JPEG"))
    lines = [{"path": ref, "label": image.label} for ref, image in image_folder.inputs.items()]
    lines.append({"path": "big.jpg", "label": 1})
    # an absolute path (to a file of its own: a second name for a listed file would be left out)
    (image_folder.root / "elsewhere.jpg").write_bytes(image_folder.inputs["cat/00.jpg"].data)
    lines.append({"path": str(image_folder.root / "elsewhere.jpg"), "label": 2})
    listing = image_folder.root / "list.jsonl"
    listing.write_text("".join(json.dumps(line) + "\n" for line in lines))
    options = ConvertOptions(samples_per_shard=6, prepare=PrepareOptions(max_side=30))
    python_out, native_out, targets = convert_both(ListSource(listing), tmp_path, monkeypatch, options)
    assert targets
    assert_same_files(python_out, native_out)
    assert load_manifest(native_out).count == 17


def test_the_switch_and_the_checks_that_need_python(monkeypatch: pytest.MonkeyPatch) -> None:
    assert native.FilePacker.for_task("/data", PrepareOptions()) is not None
    assert native.FilePacker.for_task(None, PrepareOptions()) is None  # generated inputs (digits)
    assert native.FilePacker.for_task("/data", PrepareOptions(check="decode")) is None
    assert native.FilePacker.for_task("/data", PrepareOptions(max_side=0)) is None
    monkeypatch.setenv(native.ENVIRONMENT_SWITCH, "0")
    assert native.FilePacker.for_task("/data", PrepareOptions()) is None


def test_pack_refuses_at_the_first_input_it_cannot_take(image_folder: ImageFolder, tmp_path: Path) -> None:
    root = image_folder.root
    packer = native.FilePacker(str(root), None)
    inputs = [("cat/00.jpg", 1, 0), ("cat/04.png", 1, 1), ("cat/01.jpg", 1, 2)]
    first = packer.pack(inputs, 0, 3, shard=0, position=0, offset=0, target=None)
    assert (len(first.lines), first.refused) == (1, True), "the PNG is the Python path's"
    size = len((root / "cat" / "00.jpg").read_bytes())
    assert first.used == 0 and len(first.blob) == 512 + -(-size // 512) * 512 + 4 * (512 + 512)
    assert first.lines[0].startswith("jpg 512 ") and first.lines[0].endswith("s000000_000000.src")
    then = packer.pack(inputs, 2, 3, shard=3, position=5, offset=4096, target=None)
    assert (len(then.lines), then.refused) == (1, False)
    assert then.lines[0].startswith("jpg 4608 ") and "s000003_000005.cls" in then.lines[0]
    assert then.blob[:14] == b"s000003_000005"
    missing = packer.pack([("cat/none.jpg", 0, 0)], 0, 1, shard=0, position=0, offset=0, target=None)
    assert (missing.used, missing.blob, missing.lines, missing.refused) == (0, b"", [], True)


def test_pack_leaves_labels_that_are_not_plain_ints_to_python(image_folder: ImageFolder) -> None:
    """Converting an int subclass or a huge int could run Python code or overflow: refused instead."""

    class Label(int):
        pass

    packer = native.FilePacker(str(image_folder.root), None)
    for label, index in [(Label(1), 0), (1, Label(0)), (2**63, 0), (1, -(2**63) - 1)]:
        packed = packer.pack([("cat/00.jpg", label, index)], 0, 1, 0, 0, 0, target=None)
        assert (packed.lines, packed.refused) == ([], True), (label, index)


def test_a_max_side_beyond_any_jpeg_is_no_limit(
    image_folder: ImageFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A limit larger than a C long is accepted (as by the Python path), and means no limit."""
    options = ConvertOptions(samples_per_shard=6, prepare=PrepareOptions(max_side=2**70))
    python_out, native_out, _ = convert_both(
        ImageFolderSource(image_folder.root), tmp_path, monkeypatch, options
    )
    assert_same_files(python_out, native_out)
    assert native.jpeg_kept_as_is(image_folder.inputs["cat/00.jpg"].data, 2**70)


def test_pack_rejects_malformed_calls(tmp_path: Path) -> None:
    pack = native._packer.pack
    args = (b"/", [("a.jpg", 0, 0)], 0, 1, 0, 0, 0, 0, 1 << 20, None, COMPONENT_ORDER, BLANK_HEADER)
    with pytest.raises(TypeError, match="tuples"):
        pack(b"/", [("a.jpg", 0)], *args[2:])
    with pytest.raises(ValueError, match="range"):
        pack(b"/", [("a.jpg", 0, 0)], 0, 2, *args[4:])
    with pytest.raises(ValueError, match="extensions"):
        pack(*args[:10], ("jpg", "cls"), BLANK_HEADER)
    with pytest.raises(BufferError):
        pack(*args[:9], b"read-only", *args[10:])


def python_keeps(data: bytes, max_side: int | None) -> bool:
    """The fast path of ``prepare_jpeg`` (check 'cheap'): a kept frame, an end marker, within max_side."""
    header = walk_header(data)
    if not header.kept_as_is or not ends_properly(data):
        return False
    return max_side is None or max(header.width, header.height) <= max_side


def test_the_c_jpeg_check_decides_as_the_python_one() -> None:
    """Held against the Python decision on valid JPEGs of every kind and on thousands of damaged ones
    (cut short anywhere in the header, any header byte replaced by a marker-like value, junk after):
    the same answer as ``prepare_jpeg``'s fast path, and nothing kept that ``prepare_jpeg`` would not
    keep as it is (should its rules ever grow stricter than the fast path's)."""
    rng = np.random.default_rng(11)
    rgb = smooth_image(rng, (61, 37))
    exif = Image.Exif()
    exif[0x0112] = 6
    bases = [
        encode(rgb, "JPEG", quality=80),
        encode(rgb, "JPEG", progressive=True),
        encode(rgb, "JPEG", optimize=True, subsampling=0),
        encode(rgb.convert("L"), "JPEG"),
        encode(rgb, "JPEG", exif=exif.tobytes()),
        encode(rgb.convert("CMYK"), "JPEG"),
        encode(rgb, "PNG"),
        b"\xff\xd8\xff\xff\xff\xd0\xff\xd9",
    ]
    corpus = []
    for data in bases:
        scan = data.find(b"\xff\xda")
        header = scan + 12 if scan > 0 else min(len(data), 700)
        corpus.append(data)
        corpus.extend(data[:cut] for cut in range(0, header))
        corpus.extend([data + b"\0\r\n\t ", data + b"junk", data[:-1], data[:-2] + b"\xff\xd9\0"])
        sof = min(
            [at for marker in (0xC0, 0xC1, 0xC2) if (at := data.find(bytes([0xFF, marker]))) > 0] or [0]
        )
        if sof > 0:  # the frame header: every frame type, precision and component count
            for position, values in (
                (sof + 1, range(0xC0, 0xD0)),
                (sof + 4, (8, 12, 16)),
                (sof + 9, range(5)),
            ):
                for value in values:
                    damaged = bytearray(data)
                    damaged[position] = value
                    corpus.append(bytes(damaged))
        for _ in range(400):
            damaged = bytearray(data)
            position = int(rng.integers(0, header))
            damaged[position] = int(rng.choice([0x00, 0x01, 0x08, 0xC0, 0xC2, 0xC3, 0xC4, 0xD0, 0xD8, 0xD9,
                                                0xDA, 0xFF, int(rng.integers(0, 256))]))  # fmt: skip
            corpus.append(bytes(damaged))
    kept = 0
    for data in corpus:
        for max_side in (None, 36, 37, 61, 60):
            expected = python_keeps(data, max_side)
            assert native.jpeg_kept_as_is(data, max_side) == expected, (data[:40], max_side)
            if expected:  # and what C keeps, the converter's own Python decision keeps as it is
                assert prepare_jpeg(data, PrepareOptions(max_side=max_side)) is data, (data[:40], max_side)
            kept += expected
    assert kept > 1000, "the corpus must hold many kept JPEGs too, not only rejects"
