"""``clusterssl extract`` and ``clusterssl cluster``: the files they promise, resumption, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import invoke, one_error_line
from trainer_helpers import tiny_config

from clusterssl.config import dump_yaml
from clusterssl.models.backbones import create_backbone
from clusterssl.models.clustering import kmeans
from clusterssl.pipeline.features.store import FeatureStore
from clusterssl.pipeline.train.checkpoint import save_backbone
from clusterssl.pipeline.train.train_config import build_train_config
from clusterssl.shards.manifest import load_manifest
from clusterssl.tools.cli import cli


@pytest.fixture(scope="module")
def backbone_file(digits16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A backbone.pt (one-block ViT, seeded random weights) with the run config that rebuilds it."""
    tmp = tmp_path_factory.mktemp("backbone")
    config = build_train_config(tiny_config(digits16, tmp / "run"))
    torch.manual_seed(0)
    module = create_backbone(config.model.backbone, **config.model.backbone_kwargs)
    return save_backbone(module, dump_yaml(config), tmp / "backbone.pt")


@pytest.fixture(scope="module")
def bank_dir(digits16: Path, backbone_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bank") / "bank"
    result = invoke("extract", str(backbone_file), str(digits16 / "train"), "--out", str(out),
                    "--num-workers", "0", "--batch-size", "200", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["num_samples"] == 1618 and summary["dim"] == 32 and summary["resumed_rows"] == 0
    return out


def test_extract_writes_a_memmappable_bank_with_its_provenance(
    bank_dir: Path, backbone_file: Path, digits16: Path
) -> None:
    from clusterssl.pipeline.features.evaluation import extract_eval_features
    from clusterssl.pipeline.features.extraction import ExtractionSettings
    from clusterssl.pipeline.train.checkpoint import load_feature_extractor

    features = np.load(bank_dir / "features.npy", mmap_mode="r")
    assert isinstance(features, np.memmap) and features.shape == (1618, 32) and features.dtype == np.float32
    module, config = load_feature_extractor(backbone_file)
    expected = extract_eval_features(
        module,
        digits16 / "train",
        spec=config.augment.eval_spec(),
        settings=ExtractionSettings(backend="torch", num_workers=0),
    )
    np.testing.assert_allclose(features, expected.features, rtol=1e-5, atol=1e-5)
    meta = FeatureStore.open(bank_dir).meta
    assert meta.complete
    assert meta.source["checkpoint"] == str(backbone_file.resolve())
    assert len(meta.source["checkpoint_sha256"]) == 64
    assert meta.source["manifest_hash"] == load_manifest(digits16 / "train").content_hash()
    assert Path(meta.source["manifest_path"]) == digits16 / "train" / "manifest.json"


def test_extract_run_again_after_an_interruption_continues_the_bank(
    bank_dir: Path, backbone_file: Path, digits16: Path, tmp_path: Path
) -> None:
    """An interruption leaves rows unwritten (and the bank unfinished): running the same command again
    embeds exactly those rows and gives the same bank."""
    copy = tmp_path / "bank"
    copy.mkdir()
    for name in ("features.npy", "labels.npy", "written.npy", "bank.json"):
        (copy / name).write_bytes((bank_dir / name).read_bytes())
    bank = FeatureStore.open(copy, writable=True)
    lost = np.arange(300, 1618)
    bank.features[lost] = 0.0
    bank.written[lost] = False
    bank.meta.complete = False
    bank.flush()
    result = invoke("extract", str(backbone_file), str(digits16 / "train"), "--out", str(copy),
                    "--num-workers", "0", "--batch-size", "200", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["resumed_rows"] == 300
    np.testing.assert_array_equal(
        np.load(copy / "features.npy", mmap_mode="r"), np.load(bank_dir / "features.npy", mmap_mode="r")
    )
    assert FeatureStore.open(copy).meta.complete


def test_cluster_writes_the_files_it_promises(bank_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "clusters"
    result = invoke("cluster", str(bank_dir), "--k", "10", "--k", "25", "--out", str(out),
                    "--grid-clusters", "3", "--grid-images", "4", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    statistics = json.loads((out / "statistics.json").read_text())
    assert statistics == {k: value["statistics"] for k, value in summary["clusterings"].items()}
    features = np.load(bank_dir / "features.npy")
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)  # L2-normalised by default
    labels = np.load(bank_dir / "labels.npy")
    for k in (10, 25):
        assignments = np.load(out / f"k{k}_assignments.npy")
        centroids = np.load(out / f"k{k}_centroids.npy")
        # The same clustering as the library call on the bank, row i = sample i.
        expected = kmeans(unit, k, niter=20, seed=0)
        np.testing.assert_array_equal(assignments, expected.assignments)
        np.testing.assert_allclose(centroids, expected.centroids, rtol=1e-5, atol=1e-6)
        stats = summary["clusterings"][str(k)]["statistics"]
        assert stats["k"] == k and stats["empty_clusters"] == 0 and 0.0 <= stats["nmi"] <= 1.0
        assert stats["objective"] == pytest.approx(expected.objective, rel=1e-6)
        assert labels.min() >= 0  # the digits are labelled, so NMI is there
        for name in ("sizes_plot", "samples_grid"):
            path = Path(summary["clusterings"][str(k)]["files"][name])
            assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    grid = Image.open(out / "k10_samples.png")
    assert grid.size[0] > grid.size[1]  # 4 images per row, 3 rows


def test_cluster_spherical_and_pca_options(bank_dir: Path, tmp_path: Path) -> None:
    from clusterssl.models.clustering import pca_whiten

    features = np.load(bank_dir / "features.npy")
    result = invoke(
        "cluster", str(bank_dir), "--k", "10", "--out", str(tmp_path / "s"), "--spherical", "--json"
    )
    assert result.exit_code == 0, result.output
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    expected = kmeans(unit, 10, seed=0, spherical=True)
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "k10_assignments.npy"), expected.assignments)
    np.testing.assert_allclose(
        np.linalg.norm(np.load(tmp_path / "s" / "k10_centroids.npy"), axis=1), 1.0, rtol=1e-5
    )

    raw = invoke(
        "cluster", str(bank_dir), "--k", "10", "--out", str(tmp_path / "r"), "--no-l2-normalize", "--json"
    )
    assert raw.exit_code == 0, raw.output
    np.testing.assert_array_equal(
        np.load(tmp_path / "r" / "k10_assignments.npy"), kmeans(features, 10, seed=0).assignments
    )

    result = invoke(
        "cluster", str(bank_dir), "--k", "10", "--out", str(tmp_path / "p"), "--pca-dim", "8", "--json"
    )
    assert result.exit_code == 0, result.output
    whitened, _ = pca_whiten(features, dim=8)
    np.testing.assert_array_equal(
        np.load(tmp_path / "p" / "k10_assignments.npy"), kmeans(whitened, 10, seed=0).assignments
    )
    assert np.load(tmp_path / "p" / "k10_centroids.npy").shape == (10, 8)


def test_cluster_and_extract_errors_are_one_line_with_exit_code_2(
    bank_dir: Path, backbone_file: Path, tmp_path: Path
) -> None:
    message = one_error_line(invoke("cluster", str(bank_dir), "--k", "5000", "--out", str(tmp_path / "o")))
    assert "k=5000 is larger than the number of samples in the bank (1618)" in message
    assert not (tmp_path / "o").exists()  # checked before any work

    message = one_error_line(
        invoke("cluster", str(tmp_path / "nothing"), "--k", "5", "--out", str(tmp_path / "o"))
    )
    assert "no feature store at" in message

    empty = tmp_path / "empty"
    empty.mkdir()
    np.save(empty / "features.npy", np.zeros((0, 8), dtype=np.float32))
    (empty / "bank.json").write_text(json.dumps({"num_samples": 0, "dim": 8, "complete": True}))
    message = one_error_line(invoke("cluster", str(empty), "--k", "5", "--out", str(tmp_path / "o")))
    assert "is empty" in message

    unfinished = FeatureStore.create(20, 4, directory=tmp_path / "unfinished")
    unfinished.write(np.arange(5), np.ones((5, 4)))
    unfinished.flush()
    message = one_error_line(
        invoke("cluster", str(tmp_path / "unfinished"), "--k", "5", "--out", str(tmp_path / "o"))
    )
    assert "unfinished (5 of 20 rows)" in message

    message = one_error_line(
        invoke("extract", str(tmp_path / "missing.pt"), "digits", "--out", str(tmp_path / "b"))
    )
    assert "checkpoint not found" in message
    message = one_error_line(
        invoke("extract", str(backbone_file), str(tmp_path / "no-shards"), "--out", str(tmp_path / "b"))
    )
    assert "no shard set at" in message


@pytest.mark.parametrize("path", [("extract",), ("eval", "knn"), ("bench", "extract")])
def test_extraction_options_default_to_the_extraction_settings(path: tuple[str, ...]) -> None:
    from dataclasses import fields

    from clusterssl.pipeline.features.extraction import ExtractionSettings

    command = cli
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    defaults = {param.name: param.default for param in command.params}
    settings = ExtractionSettings()
    for field in fields(ExtractionSettings):
        if field.name != "precision":  # resolved by the trainer, not a command-line choice
            assert defaults[field.name] == getattr(settings, field.name), field.name
