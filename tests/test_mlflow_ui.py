"""The record a person opens: `mlflow server` on a loopback port over a pipeline's store, checked through
its REST API and in headless Chromium (skipped, with the reason, where Chromium is not installed)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from trainer_helpers import pipeline_dict

from clusterssl.config import from_dict
from clusterssl.pipeline.runner import PipelineConfig, run_pipeline
from clusterssl.pipeline.train.checkpoint import load_feature_extractor
from clusterssl.shards.manifest import load_manifest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
STAGES = {"convert", "pretrain", "extract", "cluster", "evaluate"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp_path = tmp_path_factory.mktemp("ui")
    config = from_dict(PipelineConfig, pipeline_dict(tmp_path))
    summary = run_pipeline(config, progress=False)
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", config.tracking.uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not come up on loopback")
                time.sleep(0.5)
        yield {"base": base, "summary": summary, "tmp": tmp_path, "uri": config.tracking.uri}
    finally:
        server.terminate()
        server.wait(timeout=30)


def api(base: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def stage_runs(base: str) -> tuple[str, dict[str, dict[str, Any]]]:
    experiment = api(base, "experiments/get-by-name?experiment_name=pipe")["experiment"]["experiment_id"]
    runs = api(base, "runs/search", {"experiment_ids": [experiment], "max_results": 100})["runs"]
    tags = {
        run["info"]["run_id"]: {t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs
    }
    return experiment, {run_id: {"tags": t} for run_id, t in tags.items()}


def test_rest_api_shows_the_parent_its_stages_and_a_plot(served_pipeline: dict[str, Any]) -> None:
    base, summary = served_pipeline["base"], served_pipeline["summary"]
    _, runs = stage_runs(base)
    children = {
        r["tags"]["stage"]: run_id
        for run_id, r in runs.items()
        if r["tags"].get("mlflow.parentRunId") == summary.run_id
    }
    assert set(children) == STAGES
    listing = api(base, f"artifacts/list?run_id={children['cluster']}&path=plots")
    paths = {f["path"] for f in listing["files"]}
    assert "plots/k5_sizes.png" in paths
    query = urllib.parse.urlencode({"run_id": children["cluster"], "path": "plots/k5_sizes.png"})
    with urllib.request.urlopen(f"{base}/get-artifact?{query}", timeout=30) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"


def stage_run(base: str, summary: Any, stage: str) -> str:
    _, runs = stage_runs(base)
    return next(
        run_id
        for run_id, r in runs.items()
        if r["tags"].get("stage") == stage and r["tags"].get("mlflow.parentRunId") == summary.run_id
    )


def test_experiment_opens_as_model_training(served_pipeline: dict[str, Any]) -> None:
    experiment = api(served_pipeline["base"], "experiments/get-by-name?experiment_name=pipe")["experiment"]
    tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_stages_carry_their_shard_sets_as_datasets(served_pipeline: dict[str, Any]) -> None:
    base, summary, tmp = served_pipeline["base"], served_pipeline["summary"], served_pipeline["tmp"]
    train = load_manifest(tmp / "shards" / "train")
    for stage, contexts in (("convert", {"train", "val"}), ("pretrain", {"training", "evaluation"})):
        run = api(base, f"runs/get?run_id={stage_run(base, summary, stage)}")["run"]
        inputs = run["inputs"]["dataset_inputs"]
        seen = {i["dataset"]["name"]: i for i in inputs}
        assert {
            t["value"] for i in inputs for t in i["tags"] if t["key"] == "mlflow.data.context"
        } == contexts
        dataset = seen["test/train"]["dataset"]
        assert dataset["digest"] == train.content_hash()
        assert json.loads(dataset["source"])["uri"] == str((tmp / "shards" / "train").resolve())
        profile = json.loads(dataset["profile"])
        assert profile["num_samples"] == train.count and profile["num_classes"] == 10


def test_pretrained_backbone_loads_from_mlflow_and_embeds(
    served_pipeline: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, summary = served_pipeline["base"], served_pipeline["summary"]
    run_id = stage_run(base, summary, "pretrain")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served_pipeline["uri"])
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/backbone").eval()
    original, _ = load_feature_extractor(summary.stages["pretrain"].record.outputs["backbone"])
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        embedded = loaded(images)
        assert embedded.shape[0] == 3 and embedded.ndim == 2
        assert torch.equal(embedded, original.eval()(images))


def chromium_dom(url: str, profile: Path, screenshot: Path | None = None) -> str:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--window-size=1400,900",
    ]  # fmt: skip
    if screenshot is not None:
        subprocess.run(
            [CHROMIUM, *flags, f"--screenshot={screenshot}", url],
            capture_output=True,
            timeout=120,
            check=False,
        )
    result = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False
    )
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package: chromium)")
def test_chromium_renders_the_runs_and_the_plot(served_pipeline: dict[str, Any]) -> None:
    base, summary, tmp = served_pipeline["base"], served_pipeline["summary"], served_pipeline["tmp"]
    experiment, runs = stage_runs(base)
    cluster = next(
        run_id
        for run_id, r in runs.items()
        if r["tags"].get("stage") == "cluster" and r["tags"].get("mlflow.parentRunId") == summary.run_id
    )
    listing = chromium_dom(f"{base}/#/experiments/{experiment}/runs", tmp / "profile-list")
    assert "pipeline-test" in listing, "the parent run is listed"
    page = chromium_dom(
        f"{base}/#/experiments/{experiment}/runs/{cluster}/artifacts/plots/k5_sizes.png",
        tmp / "profile-run",
        screenshot=tmp / "cluster-run.png",
    )
    assert "test/cluster" in page, "the stage's run page names the nested stage"
    assert "k5_sizes.png" in page and "k5_samples.png" in page, "the plot artifacts are listed"
    assert (tmp / "cluster-run.png").stat().st_size > 10_000


def visible_text(page: str) -> str:
    """The words of a dumped page, without its markup and styles, spaces collapsed."""
    text = re.sub(r"<style.*?</style>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package: chromium)")
def test_the_printed_address_opens_the_runs_table_with_the_dataset_and_the_model(
    served_pipeline: dict[str, Any],
) -> None:
    """The address clusterssl prints (the experiment's ``/runs``) shows the runs table, not MLflow 3's GenAI
    overview, with the pipeline run's shard sets in its Dataset column; the pipeline run's page lists the
    backbone its pretraining logged."""
    from clusterssl.pipeline.tracking.runs import runs_page

    base, summary, tmp = served_pipeline["base"], served_pipeline["summary"], served_pipeline["tmp"]
    experiment, _ = stage_runs(base)
    assert summary.experiment_id == experiment
    page = chromium_dom(runs_page(base, experiment), tmp / "profile-table")
    assert f"<title>Runs - Experiment {experiment} - MLflow</title>" in page
    assert "No data available for the selected time range" not in page, "not the GenAI overview"
    assert 'col-id="attributes.`Dataset`"' in page and 'col-id="attributes.`Models`"' in page
    digest = load_manifest(tmp / "shards" / "train").content_hash()
    assert f"test/train ({digest}) training" in visible_text(page), "the shard set in the Dataset column"
    run_page = visible_text(
        chromium_dom(f"{base}/#/experiments/{experiment}/runs/{summary.run_id}", tmp / "p2")
    )
    assert re.search(r"Logged models \(1\) .* Output 0 \S+ backbone Ready", run_page), "the linked backbone"
