"""`clusterssl run` under torchrun: two gloo ranks produce the same stage records and the same k-NN figure
as one process over the same global batch, with one MLflow parent run written by rank 0, and a second
launch skips every stage on every rank."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_helpers import pipeline_dict

import clusterssl

TIMEOUT_S = 600
TORCHRUN = Path(sys.executable).parent / "torchrun"
PACKAGE_PARENT = Path(clusterssl.__file__).parents[1]


def run_command(command: list[str], cwd: Path) -> dict[str, Any]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    }
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(PACKAGE_PARENT)])),
        OMP_NUM_THREADS="1",
    )
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("{")]  # rank 0 alone prints
    return json.loads(line)


def pipeline_file(tmp_path: Path, name: str, batch_size: int) -> Path:
    """One epoch of one step per rank: the global batch is the whole (shuffled) epoch, so one process
    with ``2 × batch_size`` and two ranks with ``batch_size`` each see the same samples and views.

    The step runs (forward, Sinkhorn across ranks, backward, all-reduce) with a zero learning rate:
    after one step the features are close to collapsed and k-NN votes flip on the 1e-6 differences of a
    reordered all-reduce, so equal figures need equal weights (test_ddp checks the updates themselves)."""
    data = pipeline_dict(tmp_path)
    data["workdir"] = str(tmp_path / name)
    data["pretrain"]["overrides"] = [
        f"trainer.batch_size={batch_size}",
        "method.hidden_dim=0",  # no BatchNorm: per-rank batch statistics would differ from one process's
        "trainer.threads=1",
        "optim.lr=0.0",
    ]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def comparable(stages: dict[str, Any]) -> dict[str, Any]:
    """What must agree between the runs, flat (paths and fingerprints name different work directories)."""
    flat: dict[str, Any] = {}
    for name, stage in stages.items():
        flat[f"{name}/status"] = stage["status"]
        flat[f"{name}/skipped"] = stage["skipped"]
        for key, value in stage["outputs"].items():
            if isinstance(value, (int, float)):
                flat[f"{name}/{key}"] = value
            elif isinstance(value, list):
                flat[f"{name}/{key}"] = str(value)
    return flat


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_two_ranks_run_the_pipeline_like_one_process(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from clusterssl.shards.convert import ConvertOptions, convert
    from clusterssl.shards.sources import open_source

    # the pipelines' own conversion, done first: the number of training samples decides the batch size
    section = pipeline_dict(tmp_path)["convert"]
    outcome = convert(
        open_source("digits", None, image_size=section["image_size"]),
        section["out"],
        ConvertOptions(samples_per_shard=256, holdout=0.1, seed=0, workers=1),
        progress=False,
    )
    train_count = next(s.manifest.count for s in outcome.sets if s.name == "train")
    assert train_count % 2 == 0, "two equal rank shares without padding"
    half = math.ceil(train_count / 2)

    single = run_command(
        [sys.executable, "-m", "clusterssl", "run", str(pipeline_file(tmp_path, "one", 2 * half)), "--json"],
        tmp_path,
    )
    torchrun = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "clusterssl", "run"]
    ranks_file = pipeline_file(tmp_path, "two", half)
    ranks = run_command([*torchrun, str(ranks_file), "--json"], tmp_path)

    assert comparable(ranks["stages"]) == pytest.approx(comparable(single["stages"]), abs=1e-6)
    assert not any(stage["skipped"] for name, stage in ranks["stages"].items() if name != "convert")
    assert (
        ranks["stages"]["evaluate"]["outputs"]["knn_top1"]
        == single["stages"]["evaluate"]["outputs"]["knn_top1"]
    )

    client = MlflowClient(ranks["tracking_uri"])
    experiment = client.get_experiment_by_name("pipe").experiment_id
    children = client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{ranks['run_id']}'"
    )
    assert sorted(run.data.tags["stage"] for run in children) == sorted(ranks["stages"])
    parents = client.search_runs([experiment], filter_string="tags.stage = 'pipeline'")
    assert len(parents) == 2, "one parent run per launch (one process, then two ranks)"

    again = run_command([*torchrun, str(ranks_file), "--json"], tmp_path)
    assert all(stage["skipped"] for stage in again["stages"].values()), "every rank skips what is up to date"
    records = {p.name: json.loads(p.read_text()) for p in (tmp_path / "two" / "stages").glob("*.json")}
    assert {r["stage"]: r["status"] for r in records.values()} == dict.fromkeys(ranks["stages"], "complete")
