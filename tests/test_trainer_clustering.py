"""DeepCluster, DeepCluster-v2 and PCL through the real trainer: a short run on the 16-px digits logs its
clustering statistics, and what it checkpoints agrees with the bank the extraction pass left on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from trainer_helpers import tiny_config, write_config

from clusterssl.models.deepcluster import deepcluster_v1_clustering
from clusterssl.pipeline.train.train_config import build_train_config
from clusterssl.pipeline.train.trainer import train

T = TypeVar("T")

NUM_TRAIN = 1618
STEPS_PER_EPOCH = 7  # 1,618 samples in batches of 256


def run(digits16: Path, out: Path, method: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Two epochs without evaluation; returns the metrics records and the final checkpoint."""
    config = build_train_config(
        tiny_config(digits16, out, method, data={"val": None}, trainer={"epochs": 2, "threads": 1})
    )
    summary = train(config, progress=False)
    assert summary.epochs_done == 2 and summary.steps == 2 * STEPS_PER_EPOCH and not summary.interrupted
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    return records, checkpoint


def clustering_records(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [record for record in records if key in record]


def test_deepcluster_trains_on_the_clusters_of_its_own_bank(digits16: Path, tmp_path: Path) -> None:
    records, checkpoint = run(digits16, tmp_path / "run", "deepcluster")
    logged = clustering_records(records, "clustering/nmi")
    assert len(logged) == 2  # one clustering per epoch
    assert "clustering/stability_nmi" not in logged[0] and 0.0 <= logged[1]["clustering/stability_nmi"] <= 1.0
    assert all(r["clustering/k"] == 20 and r["clustering/empty_clusters"] == 0 for r in logged)

    # The last clustering is the v1 pipeline on the bank the epoch-1 extraction wrote, row i = sample i.
    features = np.load(tmp_path / "run" / "bank-backbone" / "features.npy")
    assert features.shape == (NUM_TRAIN, 32)
    expected, _ = deepcluster_v1_clustering(features, 20, pca_dim=16, seed=1)
    labels = checkpoint["method"]["pseudo_labels"].numpy()
    np.testing.assert_array_equal(labels, expected.assignments)
    assert logged[1]["clustering/objective"] == pytest.approx(expected.objective, rel=1e-6)

    # The epoch sampled every cluster about equally: repeats sum to N and per cluster to N/k (± 1).
    repeats = checkpoint["extra"]["sample_repeats"].numpy()
    assert repeats.sum() == NUM_TRAIN
    per_cluster = np.bincount(labels, weights=repeats, minlength=20)
    assert per_cluster.min() >= NUM_TRAIN // 20 and per_cluster.max() <= NUM_TRAIN // 20 + 1
    assert any("pseudo_label_accuracy" in record for record in records)


def test_deepcluster_v2_clusters_its_memory_every_epoch(digits16: Path, tmp_path: Path) -> None:
    records, checkpoint = run(digits16, tmp_path / "run", "deepcluster_v2")
    logged = clustering_records(records, "clustering/head1/nmi")
    assert len(logged) == 2 and "clustering/head0/stability_nmi" in logged[1]
    assert [logged[0]["clustering/head0/k"], logged[0]["clustering/head1/k"]] == [10, 20]
    state = checkpoint["method"]
    assert state["memory"].shape == (2, NUM_TRAIN, 16) and bool(state["memory_filled"])
    np.testing.assert_allclose(state["memory"].norm(dim=2).numpy(), 1.0, rtol=1e-5)
    assert state["assignments"].shape == (2, NUM_TRAIN) and int(state["assignments"].min()) >= 0
    np.testing.assert_allclose(state["prototypes_1"].norm(dim=1).numpy(), 1.0, rtol=1e-5)
    bank = np.load(tmp_path / "run" / "bank-projection" / "features.npy")
    assert bank.shape == (NUM_TRAIN, 16)  # the pass before training


def test_pcl_adds_proto_nce_after_its_warmup_epoch(digits16: Path, tmp_path: Path) -> None:
    records, checkpoint = run(digits16, tmp_path / "run", "pcl")
    logged = clustering_records(records, "clustering/k20/nmi")
    assert len(logged) == 1 and logged[0]["step"] >= STEPS_PER_EPOCH - 1  # only after the warm-up epoch
    assert {"clustering/k10/phi_min", "clustering/k10/size_max", "clustering/k20/objective"} <= logged[
        0
    ].keys()
    windows = [r for r in records if "proto_nce" in r]
    assert all(r["proto_nce"] == 0.0 for r in windows if r["step"] < STEPS_PER_EPOCH)
    assert all(r["proto_nce"] > 0.0 for r in windows if r["step"] >= STEPS_PER_EPOCH)
    state = checkpoint["method"]
    assert bool(state["clustering_ready"]) and state["cluster_ids_1"].shape == (NUM_TRAIN,)
    assert state["queue"].shape == (512, 16)  # 512 is a multiple of the batch of 256
    bank = np.load(tmp_path / "run" / "bank-momentum" / "features.npy")
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "name",
    [
        "deepcluster_digits",
        "deepcluster_v2_digits",
        "pcl_digits",
        "deepcluster_imagenet",
        "deepcluster_v2_imagenet",
        "pcl_imagenet",
    ],
)
def test_bundled_configs_load_and_name_their_method(name: str) -> None:
    from clusterssl.pipeline.train.train_config import load_train_config

    config = load_train_config(name)
    assert config.method_name == name.rsplit("_", 1)[0]
    settings = config.method
    if name.endswith("_digits"):
        assert config.data.train == "digits" and config.data.val == "digits"
        # the 8x8 digits at 32 px, or at 16 px where that trained better (DeepCluster-v2)
        assert config.augment.global_size == (16 if name == "deepcluster_v2_digits" else 32)
        # Every k fits the 1,618 training digits.
        ks = getattr(settings, "num_clusters", None) or getattr(settings, "num_prototypes", None)
        assert max(ks if isinstance(ks, tuple) else (ks,)) <= NUM_TRAIN
    else:
        assert config.model.backbone == "resnet50" and config.augment.global_size == 224


def one_thread(work: Callable[[], T]) -> T:
    """``work()`` with torch and faiss on one thread each, as under OMP_NUM_THREADS=1."""
    import faiss

    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        return work()
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(faiss_threads)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun is not installed",
)
@pytest.mark.parametrize("method", ["deepcluster", "pcl"])
def test_torchrun_two_ranks_agree_on_the_clustering(digits16: Path, tmp_path: Path, method: str) -> None:
    """2 ranks (gloo): the extraction pass gathers its rows to rank 0, which clusters and broadcasts, and
    both ranks end with the same cluster tables (rank 1 keeps its buffers beside the checkpoint)."""
    config = tiny_config(
        digits16,
        tmp_path / "run",
        method,
        data={"val": None, "num_workers": 1},
        trainer={"epochs": 2, "batch_size": 100},
    )
    if method == "pcl":
        config["method"]["warmup_epochs"] = 0  # cluster in both epochs
    path = write_config(tmp_path / "cfg.yaml", config)
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
               "-m", "clusterssl.tools.cli", "train", str(path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["method"]
    rank1 = torch.load(tmp_path / "run" / "checkpoint.rank1.pt", weights_only=True)["method"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if method == "deepcluster":
        assert torch.equal(rank0["pseudo_labels"], rank1["pseudo_labels"])
        features = np.load(tmp_path / "run" / "bank-backbone" / "features.npy")
        # the ranks ran with one thread; k-means' float sums, and so its result, depend on the thread count
        expected, _ = one_thread(lambda: deepcluster_v1_clustering(features, 20, pca_dim=16, seed=1))
        np.testing.assert_array_equal(rank0["pseudo_labels"].numpy(), expected.assignments)
        assert len(clustering_records(records, "clustering/nmi")) == 2  # logged once per epoch (rank 0)
    else:
        for name in ("cluster_ids_0", "centroids_0", "phi_0", "cluster_ids_1", "queue"):
            assert torch.equal(rank0[name], rank1[name]), name
        assert len(clustering_records(records, "clustering/k20/nmi")) == 2
