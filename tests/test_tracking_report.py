"""The summaries of train, run and demo name the MLflow store the runs actually went to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import tiny_config

from clusterssl.pipeline.tracking.runs import TrackingConfig, open_tracker, ui_hint
from clusterssl.pipeline.train.train_config import build_train_config
from clusterssl.pipeline.train.trainer import train
from clusterssl.tools.demo_cmd import render_demo_summary
from clusterssl.tools.run_cmd import render_pipeline
from clusterssl.tools.train_cmd import render_train_summary


def test_ui_hint_serves_a_local_store_and_opens_a_server() -> None:
    assert ui_hint("sqlite:///mlflow.db") == "mlflow ui --backend-store-uri sqlite:///mlflow.db"
    assert (
        ui_hint("sqlite:////data/my runs/m.db")
        == "mlflow ui --backend-store-uri 'sqlite:////data/my runs/m.db'"
    )
    assert ui_hint("http://mlflow.internal:5000") == "open http://mlflow.internal:5000"
    assert ui_hint("https://mlflow.example.org") == "open https://mlflow.example.org"
    # with the experiment: its runs table, not the GenAI overview MLflow 3's UI opens an experiment on
    assert (
        ui_hint("http://mlflow.internal:5000/", "7")
        == "open http://mlflow.internal:5000/#/experiments/7/runs"
    )
    assert ui_hint("sqlite:///mlflow.db", "3") == (
        "mlflow ui --backend-store-uri sqlite:///mlflow.db, then open http://127.0.0.1:5000/#/experiments/3/runs"
    )


def test_the_environment_uri_is_the_one_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = open_tracker(TrackingConfig(system_metrics=False), run_name="x")
    tracker.close()
    assert tracker.tracking_uri == uri and (tmp_path / "env.db").is_file()
    assert open_tracker(TrackingConfig(enabled=False), run_name="x").tracking_uri is None


def test_train_summary_names_the_store_it_logged_to(
    digits16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    data = {"train": str(digits16 / "train"), "val": None}
    config = tiny_config(digits16, tmp_path / "run", trainer={"epochs": 1}, data=data,
                         tracking={"enabled": True, "experiment": "t"})  # fmt: skip
    summary = train(build_train_config(config), progress=False).to_json()
    assert summary["tracking_uri"] == uri
    text = render_train_summary(summary)
    assert f"mlflow ui --backend-store-uri {uri}" in text and "sqlite:///mlflow.db" not in text
    server = {**summary, "tracking_uri": "http://mlflow.internal:5000"}
    experiment = MlflowClient(uri).get_experiment_by_name("t").experiment_id
    assert summary["experiment_id"] == experiment
    assert f"(open http://mlflow.internal:5000/#/experiments/{experiment}/runs)" in render_train_summary(
        server
    )


def test_a_standalone_run_logs_its_shard_set_and_its_backbone(
    digits16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside a pipeline too, MLflow's runs table gets the Dataset (named by the set's folders) and the
    Model: ``runs:/<id>/backbone`` loads as a module that embeds like the saved backbone."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from clusterssl.pipeline.train.checkpoint import load_feature_extractor
    from clusterssl.shards.manifest import load_manifest

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    data = {"train": str(digits16 / "train"), "val": None}
    config = tiny_config(digits16, tmp_path / "run", trainer={"epochs": 1}, data=data,
                         tracking={"enabled": True, "experiment": "t", "uri": uri, "system_metrics": False})  # fmt: skip
    summary = train(build_train_config(config), progress=False)
    run = MlflowClient(uri).get_run(summary.run_id)
    (logged,) = run.inputs.dataset_inputs
    assert logged.dataset.name == f"{digits16.name}/train"
    assert logged.dataset.digest == load_manifest(digits16 / "train").content_hash()
    assert [(t.key, t.value) for t in logged.tags] == [("mlflow.data.context", "training")]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{summary.run_id}/backbone").eval()
    saved, _ = load_feature_extractor(summary.backbone)
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), saved.eval()(images))


def demo_summary(uri: str | None) -> dict[str, Any]:
    row = {"method": "swav", "knn_top1": 0.9, "nmi": 0.8, "seconds": 10.0, "run_id": "r"}
    return {"methods": [row], "tracking_uri": uri, "experiment_id": "2" if uri else None}


def test_demo_and_run_summaries_print_the_uri_they_report() -> None:
    local = render_demo_summary(demo_summary("sqlite:////srv/runs.db"))
    assert "mlflow ui --backend-store-uri sqlite:////srv/runs.db" in local
    assert "open http://127.0.0.1:5000/#/experiments/2/runs" in local
    server = render_demo_summary(demo_summary("http://mlflow.internal:5000"))
    assert "open http://mlflow.internal:5000/#/experiments/2/runs" in server and "mlflow ui" not in server
    assert "mlflow" not in render_demo_summary(demo_summary(None)).lower()
    pipeline = {"name": "p", "seconds": 1.0, "interrupted": False, "stages": {}, "run_id": "r",
                "tracking_uri": "https://mlflow.example.org"}  # fmt: skip
    assert "(open https://mlflow.example.org)" in render_pipeline(pipeline)
