"""`clusterssl run`: a parent MLflow run with a child per stage, skipping what is up to date, resuming an
interrupted pretraining."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_helpers import pipeline_dict, step_losses

from clusterssl.config import from_dict
from clusterssl.pipeline.runner import PipelineConfig, run_pipeline

STAGES = ["convert", "pretrain", "extract", "cluster", "evaluate"]


def children_of(client: Any, parent: str) -> dict[str, Any]:
    experiment = client.get_experiment_by_name("pipe").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return {run.data.tags["stage"]: run for run in runs}


def test_parent_and_child_runs_then_everything_skipped(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    config = from_dict(PipelineConfig, pipeline_dict(tmp_path))
    first = run_pipeline(config, progress=False)
    assert [name for name, r in first.stages.items() if not r.skipped] == STAGES
    assert (
        first.tracking_uri == config.tracking.uri and first.to_json()["tracking_uri"] == config.tracking.uri
    )
    client = MlflowClient(config.tracking.uri)
    children = children_of(client, first.run_id)
    assert sorted(children) == sorted(STAGES)
    assert all(run.info.status == "FINISHED" for run in children.values())
    # the trace from the final figure back to the shards
    convert_hash = first.stages["convert"].record.outputs["train"]["manifest_hash"]
    assert children["pretrain"].data.tags["data_manifest_hash"] == convert_hash
    assert (
        children["evaluate"].data.params["checkpoint"] == first.stages["pretrain"].record.outputs["backbone"]
    )
    assert "knn_top1" in children["evaluate"].data.metrics
    assert "k5/nmi" in children["cluster"].data.metrics
    plots = {a.path for a in client.list_artifacts(children["cluster"].info.run_id, "plots")}
    assert {"plots/k5_sizes.png", "plots/k5_samples.png"} <= plots
    manifests = client.list_artifacts(children["convert"].info.run_id, "manifests/train")
    assert [a.path for a in manifests] == ["manifests/train/manifest.json"]
    assert (
        client.get_run(first.run_id).data.metrics["knn_top1"]
        == first.stages["evaluate"].record.outputs["knn_top1"]
    )

    second = run_pipeline(config, progress=False)
    assert all(result.skipped for result in second.stages.values())
    skipped = children_of(client, second.run_id)
    assert sorted(skipped) == sorted(STAGES)
    assert all(run.data.tags.get("skipped") == "true" for run in skipped.values())
    assert skipped["pretrain"].data.tags["reused_run_id"] == children["pretrain"].info.run_id

    changed = from_dict(PipelineConfig, {**pipeline_dict(tmp_path), "cluster": {"k": [4]}})
    third = run_pipeline(changed, progress=False)
    assert [name for name, r in third.stages.items() if not r.skipped] == ["cluster"]


def test_killed_during_pretraining_then_resumed(tmp_path: Path) -> None:
    data = pipeline_dict(tmp_path, epochs=3)
    data["extract"] = {"enabled": False}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "clusterssl.tools.cli", "run", str(path), "--json"]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "work" / "pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-2000:]
    stopped_at = len(step_losses(tmp_path / "work" / "pretrain"))
    assert 3 <= stopped_at < 21

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["stages"]["convert"]["skipped"] and not summary["stages"]["pretrain"]["skipped"]
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [line["step"] for line in lines if "epoch" in line]
    assert steps == list(range(21)), "the resumed run continued where the first stopped, each step once"
    assert "knn_top1" in summary["stages"]["evaluate"]["outputs"]


@pytest.mark.parametrize("key", ["pretrain.config=/missing.yaml", "convert.source=imgfolder"])
def test_bad_pipeline_settings_are_one_line(tmp_path: Path, key: str) -> None:
    from click.testing import CliRunner

    from clusterssl.tools.cli import cli

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline_dict(tmp_path)))
    result = CliRunner().invoke(cli, ["run", str(path), "--set", key, "--no-track"])
    assert result.exit_code == 2, result.output
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_demo_under_torchrun_stops_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from clusterssl.tools.cli import cli

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline_dict(tmp_path)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for args in (["demo", "--methods", "swav", "--data-dir", str(tmp_path / "data"),
                  "--workdir", str(tmp_path / "work")],):  # fmt: skip
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        [line] = [line for line in result.stderr.splitlines() if line.strip()]
        assert "not under torchrun (WORLD_SIZE=2)" in line and "clusterssl train" in line
    assert (
        not (tmp_path / "work").exists()
        and not (tmp_path / "data").exists()
        and not (tmp_path / "shards").exists()
    )


def test_an_idx_directory_is_the_train_and_evaluation_sets(tmp_path: Path) -> None:
    """convert.source idx over a directory of train and t10k pairs: train is trained on, test is the
    evaluation set (no hold-out of its own), and a hold-out asked for anyway is one clear error."""
    import numpy as np
    from idx_helpers import write_pair

    from clusterssl.errors import PipelineError

    rng = np.random.default_rng(0)
    for split, count in (("train", 60), ("t10k", 20)):
        write_pair(
            tmp_path / "idx", split, rng.integers(0, 256, (count, 28, 28)), np.arange(count) % 10, gz=True
        )
    settings = pipeline_dict(tmp_path)
    settings["convert"] = {"source": "idx", "path": str(tmp_path / "idx"), "out": str(tmp_path / "shards"),
                           "holdout": None, "samples_per_shard": 16, "workers": 1}  # fmt: skip
    settings["cluster"] = {"enabled": False}
    settings["tracking"]["enabled"] = False
    summary = run_pipeline(from_dict(PipelineConfig, settings), progress=False)
    convert = summary.stages["convert"].record.outputs
    assert (convert["train"]["count"], convert["val"]["count"]) == (60, 20)
    assert convert["val"]["dir"] == str(tmp_path / "shards" / "test")
    assert summary.stages["evaluate"].record.outputs["knn_top1"] >= 0.0
    settings["convert"]["holdout"] = 0.1
    with pytest.raises(PipelineError, match="a directory of IDX pairs is split already"):
        run_pipeline(from_dict(PipelineConfig, settings), progress=False)
