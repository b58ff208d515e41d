"""`eval linear`: the probe beside k-NN and NMI in the JSON, and the embedding map as a file and an artifact."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import yaml
from cli_helpers import invoke
from PIL import Image
from trainer_helpers import tiny_config

from clusterssl.models.backbones import create_backbone
from clusterssl.pipeline.features.embedding_map import embedding_map, sample_rows
from clusterssl.pipeline.train.checkpoint import save_backbone
from clusterssl.shards.manifest import load_manifest


def random_backbone(digits16: Path, tmp_path: Path) -> Path:
    """A backbone.pt of the tiny test architecture at its seeded random init (no training needed)."""
    config = tiny_config(digits16, tmp_path / "run")
    model = config["model"]
    module = create_backbone(model["backbone"], **model.get("backbone_kwargs", {}))
    return save_backbone(module, yaml.safe_dump(config), tmp_path / "backbone.pt")


def test_eval_linear_reports_the_probe_and_logs_the_map(digits16: Path, tmp_path: Path) -> None:
    backbone = random_backbone(digits16, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = invoke(
        "eval", "linear", str(backbone), "--train", str(digits16 / "train"), "--val", str(digits16 / "val"),
        "--num-workers", "0", "--tracking-uri", uri, "--map", str(tmp_path / "map.png"), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    num_val = load_manifest(digits16 / "val").count
    assert {"knn_top1", "linear_top1", "nmi", "ari"} <= summary.keys()
    probe = summary["linear_probe"]
    assert probe["num_val"] == num_val and probe["top1"] == summary["linear_top1"]
    assert f"{probe['weight_decay']:g}" in probe["holdout_top1"]
    # digits are easy: even random features separate them well above chance (10%)
    assert summary["linear_top1"] > 0.5
    assert summary["embedding_map"]["points"] == num_val
    assert Image.open(tmp_path / "map.png").format == "PNG"
    client = mlflow.MlflowClient(uri)
    assert client.get_run(summary["run_id"]).data.metrics["linear_top1"] == summary["linear_top1"]
    assert "embedding_map.png" in [a.path for a in client.list_artifacts(summary["run_id"])]


def test_map_has_one_point_per_sampled_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), [300, 300, 300, 300, 12])
    features = rng.normal(0, 1, (len(labels), 8)) + labels[:, None] * 3
    drawn = embedding_map(features, labels, tmp_path / "m.png", max_points=200, class_names=list("abcde"))
    assert drawn.points.shape == (len(drawn.rows), 2) and len(drawn.rows) <= 200
    assert np.isfinite(drawn.points).all()
    assert set(labels[drawn.rows]) == set(range(5)), "a small class keeps its share of the sample"
    assert Image.open(tmp_path / "m.png").size[0] > 0


def test_sample_is_stratified_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [1000, 500, 400, 100])
    rows = sample_rows(labels, 200, seed=3)
    assert np.array_equal(rows, sample_rows(labels, 200, seed=3))
    assert np.bincount(labels[rows]).tolist() == [100, 50, 40, 10]
    assert np.array_equal(sample_rows(labels[:150], 200, seed=0), np.arange(150))
