"""The layout measurement writes each layout so that its readers get every sample back."""

from __future__ import annotations

import struct
from pathlib import Path

from conftest import ImageFolder

from clusterssl.shards.convert import ConvertOptions, convert
from clusterssl.shards.reader import iter_samples, iter_tar_members
from clusterssl.shards.sources import ImageFolderSource
from clusterssl.tools.bench_layout import LAYOUTS, _write, run_measurement


def test_layouts_hold_what_they_promise(image_folder: ImageFolder, tmp_path: Path) -> None:
    convert(ImageFolderSource(image_folder.root), tmp_path / "set", ConvertOptions())
    samples = list(iter_samples(tmp_path / "set"))
    pair = _write("typed-pair", samples, tmp_path)
    members = list(iter_tar_members(pair))
    assert {ext for _, ext, _ in members} == {"jpg", "cls", "meta.i64"}
    meta = [struct.unpack("<qq", payload) for _, ext, payload in members if ext == "meta.i64"]
    assert meta == [(s.label, s.index) for s in samples]
    summary = run_measurement(tmp_path / "set", samples=10)
    sizes = [row["bytes_per_sample"] for row in summary["layouts"]]
    assert [row["layout"] for row in summary["layouts"]] == list(LAYOUTS)
    assert sizes[0] > sizes[1] > sizes[2]  # fewer members, fewer 512-byte headers
