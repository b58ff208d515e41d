"""Inputs a careless or hostile source can hold: decompression bombs, symlink loops, label bombs,
duplicates; and two conversions racing for one output directory."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import invoke, one_error_line
from click.testing import CliRunner
from conftest import encode, jpeg_bytes, smooth_image, with_declared_size

from clusterssl.shards.convert import ConvertOptions, convert
from clusterssl.shards.images import PrepareOptions
from clusterssl.shards.manifest import LargeImages, load_manifest
from clusterssl.shards.reader import iter_samples
from clusterssl.shards.sources import ImageFolderSource, ListSource
from clusterssl.tools.cli import cli


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header (with a valid checksum) claims ``width``×``height`` pixels."""
    png = bytearray(encode(smooth_image(np.random.default_rng(0), (8, 8)), "PNG"))
    png[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    return bytes(png)


def folder_with(tmp_path: Path, files: dict[str, bytes]) -> Path:
    root = tmp_path / "images"
    for name, data in files.items():
        (root / "a" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "a" / name).write_bytes(data)
    return root


@pytest.mark.parametrize("native_loop", ["1", "0"])
def test_decompression_bombs_are_skipped_with_their_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_loop: str
) -> None:
    """A JPEG of a few hundred bytes declaring 60000x60000 (intact markers) and a PNG declaring
    10000x10000 are skipped by their header size, whichever per-sample loop (C or Python) runs."""
    monkeypatch.setenv("CLUSTERSSL_NATIVE", native_loop)
    rng = np.random.default_rng(5)
    bomb = with_declared_size(jpeg_bytes(rng), 60000, 60000)
    assert len(bomb) < 2000
    root = folder_with(
        tmp_path, {"good.jpg": jpeg_bytes(rng), "bomb.jpg": bomb, "bomb.png": png_declaring(10000, 10000)}
    )
    convert(ImageFolderSource(root), tmp_path / "out", ConvertOptions())
    manifest = load_manifest(tmp_path / "out")
    reasons = {s.input: s.reason for s in manifest.skipped}
    assert manifest.count == 1 and set(reasons) == {"a/bomb.jpg", "a/bomb.png"}
    assert "3600.0 MP" in reasons["a/bomb.jpg"] and "--max-pixels" in reasons["a/bomb.jpg"]
    assert "100.0 MP" in reasons["a/bomb.png"]
    assert manifest.params["max_pixels"] == 89478485
    # the limit is the user's to raise: then the JPEG's intact markers are all the cheap check sees
    (root / "a" / "bomb.png").unlink()
    convert(
        ImageFolderSource(root), tmp_path / "raised", ConvertOptions(prepare=PrepareOptions(max_pixels=None))
    )
    assert load_manifest(tmp_path / "raised").count == 2


def test_max_pixels_option_and_large_images_in_info(tmp_path: Path) -> None:
    """``--max-pixels`` sets the limit; images above 4096 px on a side are counted in the manifest and
    named by ``shards info`` (and a manifest from before that record still reads)."""
    rng = np.random.default_rng(6)
    root = folder_with(
        tmp_path, {"wide.jpg": encode(smooth_image(rng, (4100, 8)), "JPEG"), "b.jpg": jpeg_bytes(rng)}
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["shards", "convert", "imagefolder", str(root), str(out), "--max-pixels", "1000"]
    )
    assert result.exit_code == 0, result.output
    assert [s.input for s in load_manifest(out).skipped] == ["a/wide.jpg"]
    result = CliRunner().invoke(cli, ["shards", "convert", "imagefolder", str(root), str(tmp_path / "all")])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "all")
    assert manifest.count == 2 and manifest.large_images == LargeImages(4096, 1, 4100)
    info = CliRunner().invoke(cli, ["shards", "info", str(tmp_path / "all")])
    assert info.exit_code == 0 and "1 image(s) above 4096 px on a side (up to 4100 px)" in info.output
    data = json.loads((tmp_path / "all" / "manifest.json").read_text())
    del data["large_images"], data["notes"]
    (tmp_path / "all" / "manifest.json").write_text(json.dumps(data))
    info = CliRunner().invoke(cli, ["shards", "info", str(tmp_path / "all")])
    assert info.exit_code == 0 and "above 4096" not in info.output


def test_symlink_loops_end_and_unopenable_files_are_skipped(tmp_path: Path) -> None:
    """``a/self.jpg -> self.jpg`` is skipped with its reason; ``a/loop -> ..`` and a link to another
    class folder are not walked again; a folder outside linked twice is walked once."""
    rng = np.random.default_rng(7)
    root = folder_with(tmp_path, {"good.jpg": jpeg_bytes(rng)})
    (root / "b").mkdir()
    (root / "b" / "c.jpg").write_bytes(jpeg_bytes(rng))
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "e.jpg").write_bytes(jpeg_bytes(rng))
    (root / "a" / "self.jpg").symlink_to("self.jpg")
    (root / "a" / "loop").symlink_to("..")
    (root / "a" / "other").symlink_to("../b")
    (root / "a" / "ext").symlink_to(tmp_path / "extra")
    (root / "a" / "ext-again").symlink_to(tmp_path / "extra")
    convert(ImageFolderSource(root), tmp_path / "out", ConvertOptions())
    manifest = load_manifest(tmp_path / "out")
    assert manifest.count == 3, "a/good.jpg, b/c.jpg and the outside folder's image once"
    assert [(s.input, s.reason.split(":")[0]) for s in manifest.skipped] == [("a/self.jpg", "cannot read")]
    assert "symbolic links" in manifest.skipped[0].reason


def list_file(tmp_path: Path, rows: list[tuple[str, str]], images: int = 3) -> Path:
    """``list.csv`` of ``rows`` (path, label) next to ``images`` JPEGs named ``0.jpg``, ``1.jpg``…"""
    rng = np.random.default_rng(8)
    for i in range(images):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(rng))
    path = tmp_path / "list.csv"
    path.write_text("path,label\n" + "".join(f"{ref},{label}\n" for ref, label in rows))
    return path


@pytest.mark.parametrize(
    ("label", "fragment"),
    [
        ("1000000000000", "label 1000000000000 for 1.jpg is above 99999"),
        ("1000000", "label 1000000 for 1.jpg is above 99999"),
    ],
)
def test_huge_integer_labels_are_refused_in_one_line(tmp_path: Path, label: str, fragment: str) -> None:
    """One id of 10^12 used to build a class name per integer up to it (MemoryError); 10^6 wrote a
    million empty classes into the manifest."""
    listing = list_file(tmp_path, [("0.jpg", "0"), ("1.jpg", label)])
    line = one_error_line(invoke("shards", "convert", "list", str(listing), str(tmp_path / "out")))
    assert fragment in line and "as names" in line
    listing = list_file(tmp_path, [("0.jpg", "0"), ("1.jpg", "99999")])  # sparse but sane: kept as ids
    convert(ListSource(listing), tmp_path / "ok", ConvertOptions())
    assert len(load_manifest(tmp_path / "ok").classes) == 100000


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        (["cat", "1", "10"], "mix integers and names (e.g. '1' for 1.jpg and 'cat' for 0.jpg)"),
        (["1", "1.5", "2"], "mix integers and names (e.g. '1' for 0.jpg and '1.5' for 1.jpg)"),
    ],
)
def test_mixed_labels_are_refused_naming_one_of_each(
    tmp_path: Path, labels: list[str], fragment: str
) -> None:
    """Integers among names became names sorted as text ('10' got id 1); a float made every label a name."""
    listing = list_file(tmp_path, [(f"{i}.jpg", label) for i, label in enumerate(labels)])
    assert fragment in one_error_line(
        invoke("shards", "convert", "list", str(listing), str(tmp_path / "out"))
    )


def test_duplicate_list_entries_are_written_once(tmp_path: Path) -> None:
    """The same file under several names (``./0.jpg``, ``x/../0.jpg``, a link) is one input: written
    once, never in both train and val, and the count of dropped entries is noted."""
    (tmp_path / "x").mkdir()
    (tmp_path / "link.jpg").symlink_to(tmp_path / "0.jpg")
    rows = [(f"{i}.jpg", "") for i in range(4)] + [("./0.jpg", ""), ("x/../1.jpg", ""), ("link.jpg", "")]
    listing = list_file(tmp_path, rows, images=4)
    result = invoke("shards", "convert", "list", str(listing), str(tmp_path / "out"), "--holdout", "0.5")
    assert result.exit_code == 0, result.output
    assert "note: 3 entries of list.csv named a file listed before" in result.output
    train, val = ({s.src for s in iter_samples(tmp_path / "out" / name)} for name in ("train", "val"))
    assert not train & val and train | val == {"0.jpg", "1.jpg", "2.jpg", "3.jpg"}
    assert any("3 entries" in note for note in load_manifest(tmp_path / "out" / "train").notes)


def test_the_conversion_lock_admits_one_writer_after_another_finishes(tmp_path: Path) -> None:
    """A conversion finishing while a second waits on the lock file and a third arrives: the lock
    file used to be removed while held, so the second locked the removed file and the third a new
    one, both writing at once."""
    fcntl = pytest.importorskip("fcntl")  # advisory locks are POSIX
    import clusterssl.shards.convert as convert_module

    out = tmp_path / "out"
    out.mkdir()
    with convert_module._exclusive(out):  # the first conversion
        waiting = open(out / convert_module.LOCK_NAME, "a")  # noqa: SIM115 - the second has opened it
    try:
        # the third takes the lock the first released; the second must not get it too
        with convert_module._exclusive(out), pytest.raises(BlockingIOError):
            fcntl.flock(waiting.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        waiting.close()
    assert (out / convert_module.LOCK_NAME).exists()


@pytest.mark.parametrize("name", ["../elsewhere.tar", "/etc/passwd", "sub/shard.tar", "..", ""])
def test_manifest_file_names_must_stay_in_the_set_directory(tmp_path: Path, name: str) -> None:
    """Shard and index names from a manifest become paths: one from elsewhere must not reach outside."""
    rng = np.random.default_rng(9)
    root = folder_with(tmp_path, {"0.jpg": jpeg_bytes(rng)})
    convert(ImageFolderSource(root), tmp_path / "out", ConvertOptions())
    path = tmp_path / "out" / "manifest.json"
    original = json.loads(path.read_text())
    for field in ("file", "index_file"):
        data = json.loads(json.dumps(original))
        data["shards"][0][field] = name
        path.write_text(json.dumps(data))
        line = one_error_line(invoke("shards", "info", str(tmp_path / "out")))
        assert "not a plain file name" in line and repr(name) in line


def test_control_characters_in_input_names_are_escaped_in_the_summary(tmp_path: Path) -> None:
    """A file name can hold a newline: printed raw it would fake a line of the convert summary."""
    rng = np.random.default_rng(10)
    root = folder_with(
        tmp_path, {"good.jpg": jpeg_bytes(rng), "x\nskipped fake.jpg: \x1b[31mok.jpg": b"not an image"}
    )
    result = invoke("shards", "convert", "imagefolder", str(root), str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "skipped a/x\\nskipped fake.jpg: \\x1b[31mok.jpg: not an image" in result.output
    assert not any(line.startswith("skipped fake") for line in result.output.splitlines())
    assert "\x1b" not in result.output
