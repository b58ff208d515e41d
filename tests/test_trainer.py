"""The trainer end to end on real shards: MLflow record, resume equality, and the one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from trainer_helpers import step_losses, tiny_config, write_config

from clusterssl.pipeline.train.train_config import build_train_config
from clusterssl.pipeline.train.trainer import train
from clusterssl.tools.cli import cli


def test_mlflow_run_holds_params_metrics_tags_and_artifacts(digits16: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = build_train_config(
        tiny_config(
            digits16,
            tmp_path / "run",
            trainer={"epochs": 1},
            tracking={"enabled": True, "uri": uri, "experiment": "t"},
        )
    )
    summary = train(config, progress=False)
    assert summary.run_id is not None and not summary.interrupted
    run = MlflowClient(uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["method.name"] == "swav" and params["optim.lr"] == "0.1" and params["trainer.epochs"] == "1"
    assert params["augment.global_size"] == "16" and params["model.backbone"] == "vit_tiny_p4"
    tags = run.data.tags
    assert tags["method"] == "swav" and tags["backbone"] == "vit_tiny_p4"
    assert tags["data_manifest_hash"] == config_manifest_hash(digits16)
    assert len(tags["git_commit"]) in (40, len("unknown"))
    metrics = run.data.metrics
    for key in (
        "loss",
        "lr",
        "images_per_s",
        "data_wait_share",
        "code_entropy",
        "prototypes_used",
        "knn_top1",
        "nmi",
        "ari",
    ):
        assert key in metrics, key
    assert 0.0 <= metrics["knn_top1"] <= 1.0
    history = MlflowClient(uri).get_metric_history(summary.run_id, "loss")
    assert len(history) >= 2, "loss is logged every log_every steps"
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(summary.run_id)}
    assert {"backbone.pt", "config.yaml", "plots"} <= artifacts
    assert "plots/loss.png" in {a.path for a in MlflowClient(uri).list_artifacts(summary.run_id, "plots")}
    logged_config = yaml.safe_load(
        Path(MlflowClient(uri).download_artifacts(summary.run_id, "config.yaml", str(tmp_path))).read_text()
    )
    assert logged_config["method"]["num_prototypes"] == 10


def config_manifest_hash(root: Path) -> str:
    from clusterssl.shards.manifest import load_manifest

    return load_manifest(root / "train").content_hash()


def _steps_logged(metrics: Path) -> int:
    """Per-step records in a run's metrics.jsonl so far (clustering and window records are not steps)."""
    if not metrics.exists():
        return 0
    return sum('"epoch"' in line for line in metrics.read_text().splitlines())


def _cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "clusterssl.tools.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    "method",
    [
        "swav",
        "dino",
        "ibot",
        # The clustering methods' tables (pseudo-labels, memory, prototypes, queue) come back from the
        # checkpoint: a mid-epoch resume re-clusters nothing. Slow: an extraction pass per epoch.
        *(pytest.param(name, marks=pytest.mark.slow) for name in ("deepcluster", "deepcluster_v2", "pcl")),
    ],
)
def test_interrupted_and_resumed_run_reproduces_the_losses(
    digits16: Path, tmp_path: Path, method: str
) -> None:
    """SIGTERM mid-run (mid-epoch), then --resume: every step's loss equals the uninterrupted run's."""
    no_eval = {"train": str(digits16 / "train"), "val": None}
    reference = build_train_config(
        tiny_config(digits16, tmp_path / "reference", method, trainer={"epochs": 3}, data=no_eval)
    )
    train(reference, progress=False)
    expected = step_losses(tmp_path / "reference")
    assert len(expected) == 21  # 3 epochs × 7 batches of 256 over 1,618 samples

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = {"enabled": True, "uri": uri, "experiment": "t", "system_metrics": False}
    resumable = tiny_config(
        digits16, tmp_path / "resumed", method, trainer={"epochs": 3}, data=no_eval, tracking=tracked
    )
    config = write_config(tmp_path / "cfg.yaml", resumable)
    process = _cli("train", str(config), cwd=tmp_path)
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and _steps_logged(metrics) < 4:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    done = len(step_losses(tmp_path / "resumed"))
    assert 4 <= done < 21, f"stopped mid-run, not after {done} of 21 steps: {stderr[-2000:]}"
    from mlflow import MlflowClient

    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("t").experiment_id])
    assert run.info.status == "KILLED", "an interrupted run is not finished"

    summary = train(build_train_config(resumable), resume=True, progress=False)
    assert summary.steps == 21 and not summary.interrupted
    assert step_losses(tmp_path / "resumed") == expected
    assert summary.run_id == run.info.run_id
    assert MlflowClient(uri).get_run(run.info.run_id).info.status == "FINISHED"


def test_cli_errors_are_one_line_with_exit_code_2(digits16: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg.yaml", tiny_config(digits16, tmp_path / "run"))
    cases = {
        ("--set", "optim.lrr=1"): "unknown config key 'optim.lrr'",
        (
            "--set",
            "method.name=swv",
        ): "unknown method 'swv'; known: deepcluster, deepcluster_v2, dino, ibot, pcl, swav",
        ("--set", "model.backbone=resnt18"): "unknown backbone 'resnt18'; known:",
        ("--set", "data.train=/nonexistent/shards"): "no shard set at /nonexistent/shards",
        (
            "--set",
            "tracking.enabled=true",
            "--tracking-uri",
            "http://127.0.0.1:9",
        ): "cannot reach the MLflow tracking store",
    }
    cases[()] = "config file not found"
    runner = CliRunner()
    for extra, message in cases.items():
        args = ["train", str(config if extra else tmp_path / "missing.yaml"), *extra]
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, (extra, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (extra, result.stderr)


def test_train_json_summary_chains_into_eval(digits16: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "cfg.yaml", tiny_config(digits16, tmp_path / "run", trainer={"epochs": 1})
    )
    process = _cli("train", str(config), "--json", cwd=tmp_path)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert {"run_id", "checkpoint", "knn_top1", "nmi", "ari"} <= summary.keys()
    assert Path(summary["checkpoint"]).is_file()
    result = CliRunner().invoke(
        cli,
        ["eval", "knn", summary["checkpoint"], "--train", str(digits16 / "train"), "--val", str(digits16 / "val"),
         "--num-workers", "0", "--no-track", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    # the same features and the same protocol give the same figures as the end-of-training evaluation
    assert evaluated["knn_top1"] == pytest.approx(summary["knn_top1"])
    assert evaluated["nmi"] == pytest.approx(summary["nmi"])


def test_compiled_backbone_trains_to_the_eager_losses(digits16: Path, tmp_path: Path) -> None:
    """trainer.compile: torch.compile of the backbone changes how the step runs, not what it computes."""
    no_eval = {"train": str(digits16 / "train"), "val": None}
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        config = tiny_config(digits16, out, "swav", trainer={"epochs": 1, "compile": compiled}, data=no_eval)
        train(build_train_config(config), progress=False)
        losses[compiled] = step_losses(out)
    assert len(losses[True]) == 7
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
