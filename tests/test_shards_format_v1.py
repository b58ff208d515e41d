"""Sets written in format version 1 (typed components named `label` and `index`) keep reading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ImageFolder

from clusterssl.pipeline.data.loader import build_loader
from clusterssl.shards.convert import ConvertOptions, convert
from clusterssl.shards.format import MANIFEST_NAME, dali_index_path
from clusterssl.shards.manifest import load_manifest
from clusterssl.shards.reader import iter_samples, iter_tar_members
from clusterssl.shards.sources import ImageFolderSource
from clusterssl.shards.tario import ShardTarWriter
from clusterssl.shards.verify import verify

VERSION_1_NAMES = {"label.i64": "label", "index.i64": "index"}


def rewrite_as_version_1(directory: Path) -> None:
    """Rename the typed members as version 1 did, with matching DALI indexes, sizes and hashes."""
    manifest_path = directory / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    for entry in data["shards"]:
        tar = directory / entry["file"]
        samples: dict[str, list[tuple[str, bytes]]] = {}
        for key, ext, payload in iter_tar_members(tar):
            samples.setdefault(key, []).append((VERSION_1_NAMES.get(ext, ext), payload))
        with ShardTarWriter(tar) as writer:
            for key, components in samples.items():
                writer.add_sample(key, components)
            writer.write_dali_index(dali_index_path(tar))
        entry["bytes"], entry["sha256"] = writer.bytes_written, writer.sha256
    data["format_version"] = 1
    data["params"]["format_version"] = 1
    manifest_path.write_text(json.dumps(data))


@pytest.fixture
def version_1_set(image_folder: ImageFolder, tmp_path: Path) -> Path:
    out = tmp_path / "v1"
    convert(ImageFolderSource(image_folder.root), out, ConvertOptions(samples_per_shard=4))
    rewrite_as_version_1(out)
    assert {ext for _, ext, _ in iter_tar_members(next(out.glob("*.tar")))} == {
        "jpg",
        "cls",
        "label",
        "index",
        "src",
    }
    return out


def test_version_1_set_verifies_and_reads(version_1_set: Path) -> None:
    assert load_manifest(version_1_set).format_version == 1
    report = verify(version_1_set)
    assert report.ok, report.render()
    samples = list(iter_samples(version_1_set))
    assert [s.index for s in samples] == list(range(15))


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_version_1_set_loads_in_both_backends(version_1_set: Path, backend: str) -> None:
    labels = {s.index: s.label for s in iter_samples(version_1_set)}
    loader = build_loader(str(version_1_set), "eval", 5, device="cpu", backend=backend, num_workers=0)
    seen = {}
    for batch in loader:
        for index, label in zip(batch.index.tolist(), batch.labels.tolist(), strict=True):
            if index >= 0:
                seen[index] = label
    assert seen == labels
    assert all(isinstance(v, torch.Tensor) for v in batch.views) and np.isfinite(batch.views[0].numpy()).all()
