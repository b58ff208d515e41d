"""Two real processes (gloo, CPU) for the memory-bank methods' distributed pieces.

One spawn serves every test in the file: each rank runs the training run's extraction pass (fresh, and
continuing a bank that a one-process pass left unfinished on rank 0's disk) and its evaluation, PCL's
shuffled key forward and queue, and DeepCluster-v2's memory update, and saves what it got; the tests
compare with one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed_helpers import gloo_process_group, load_rank_results, run_ranks
from extraction_helpers import EVAL_SPEC, tiny_module
from fakes import TinyBackbone

from clusterssl.models.deepcluster_v2 import DeepClusterV2, DeepClusterV2Config
from clusterssl.models.pcl import PCL, PCLConfig, shuffled_key_forward
from clusterssl.pipeline.data.datasets import resolve_data
from clusterssl.pipeline.features import passes as passes_module
from clusterssl.pipeline.features.evaluation import EvalResult
from clusterssl.pipeline.features.extraction import ExtractionSettings, extract_features
from clusterssl.pipeline.features.passes import RunPasses
from clusterssl.pipeline.features.store import FeatureStore
from clusterssl.pipeline.train.world import DistributedEnv

WORLD_SIZE = 2
TIMEOUT_S = 180
PARTIAL_BATCHES = 4
LOCAL_BATCH = 5


SETTINGS = ExtractionSettings(batch_size=100, backend="torch", num_workers=0)


def run_passes(digits: Path, out: Path, env: DistributedEnv) -> RunPasses:
    """A training run's passes over the 16-px digits, as the trainer builds them."""
    train, val = (resolve_data(str(digits / split), split=split) for split in ("train", "val"))
    return RunPasses(train, val, EVAL_SPEC, SETTINGS, torch.device("cpu"), env, out, progress=False)


def evaluate(passes: RunPasses) -> EvalResult:
    return passes.evaluate(tiny_module(), knn_k=20, knn_temperature=0.07, seed=0)


def worker(rank: int, init_file: str, out_dir: str, digits: str) -> None:
    with gloo_process_group(rank, init_file, WORLD_SIZE, TIMEOUT_S):
        out = Path(out_dir)
        env = DistributedEnv(rank=rank, world_size=WORLD_SIZE)
        passes = run_passes(Path(digits), out, env)
        results: dict[str, Any] = {}

        # Every index each rank writes into a bank (rank 0: the gathered rows of both ranks).
        written: list[np.ndarray] = []
        original_write = FeatureStore.write

        def recording_write(self: FeatureStore, indices: Any, *args: Any, **kwargs: Any) -> None:
            written.append(np.asarray(indices).copy())
            original_write(self, indices, *args, **kwargs)

        def written_indices() -> torch.Tensor:
            indices = np.concatenate(written) if written else np.empty(0, dtype=np.int64)
            written.clear()
            return torch.from_numpy(indices)

        FeatureStore.write = recording_write  # type: ignore[method-assign]
        fresh = passes.extract(tiny_module(), name="fresh", epoch=0)
        results["fresh"] = torch.from_numpy(np.asarray(fresh.features, dtype=np.float32))
        results["fresh_num_samples"] = fresh.num_samples
        results["fresh_written"] = written_indices()
        # Continue the bank a one-process pass left unfinished in rank 0's directory.
        common: dict[str, Any] = {"spec": EVAL_SPEC, "settings": SETTINGS, "env": env, "progress": False}
        resumed = extract_features(
            tiny_module(),
            str(Path(digits) / "train"),
            out_dir=out / "partial",
            source={"test": "resume"},
            **common,
        )
        results["resumed"] = torch.from_numpy(np.asarray(resumed.features, dtype=np.float32))
        results["resumed_shape"] = (resumed.meta.num_samples, resumed.meta.dim)
        results["resumed_written"] = written_indices()
        FeatureStore.write = original_write  # type: ignore[method-assign]

        results.update(evaluation_pieces(passes))
        results.update(pcl_pieces(rank))
        results.update(deepcluster_v2_pieces(rank))
        torch.save(results, out / f"rank{rank}.pt")


def evaluation_pieces(passes: RunPasses) -> dict[str, Any]:
    """The evaluation's metrics on this rank, and how many times this rank computed them."""
    calls = []
    original = passes_module.evaluate_features

    def counting(*args: Any, **kwargs: Any) -> EvalResult:
        calls.append(1)
        return original(*args, **kwargs)

    passes_module.evaluate_features = counting  # type: ignore[assignment]
    try:
        result = evaluate(passes)
    finally:
        passes_module.evaluate_features = original  # type: ignore[assignment]
    return {"eval": result.metrics(), "eval_computed": len(calls)}


def global_images(seed: int = 0) -> torch.Tensor:
    return torch.randn(WORLD_SIZE * LOCAL_BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def rank_rows(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]


def pcl_pieces(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)  # same weights on both ranks
    pcl = PCL(TinyBackbone(), PCLConfig(hidden_dim=8, feat_dim=4, queue_length=30, num_clusters=(3,)))
    pcl.eval()  # BatchNorm-free head, but eval keeps the key encoder a pure per-sample function
    torch.manual_seed(100 + rank)  # the permutation must come from rank 0 whatever the local RNG says
    keys = shuffled_key_forward(pcl.key_encoder, rank_rows(global_images(), rank))
    pcl._ensure_queue(LOCAL_BATCH)
    before = pcl.queue.clone()
    # Rank 0 has 2 real samples, rank 1 has 4: the queue takes all 6, rank 0's first, on both ranks.
    real = 2 if rank == 0 else 4
    valid = torch.arange(LOCAL_BATCH) < real
    pcl._enqueue(keys[valid], valid)
    return {"pcl_keys": keys, "pcl_queue_before": before, "pcl_queue": pcl.queue.clone()}


def deepcluster_v2_pieces(rank: int) -> dict[str, Any]:
    model = DeepClusterV2(TinyBackbone(), DeepClusterV2Config(hidden_dim=0, feat_dim=3, num_prototypes=(2,)))
    model.memory = torch.zeros(2, 20, 3)
    index = torch.tensor([0, 3, -1, 7, 9]) if rank == 0 else torch.tensor([12, -1, 19, 4, 5])
    embeddings = torch.arange(2 * LOCAL_BATCH * 3, dtype=torch.float32).view(2, LOCAL_BATCH, 3) + 100 * rank
    model._update_memory(index, embeddings)
    return {"dc2_memory": model.memory.clone(), "dc2_index": index, "dc2_embeddings": embeddings}


@pytest.fixture(scope="module")
def rank_results(digits16: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ddp-extract")
    # A one-process pass interrupted after a few batches: rank 0's directory holds the unfinished bank.
    extract_features(
        tiny_module(),
        str(digits16 / "train"),
        spec=EVAL_SPEC,
        settings=SETTINGS,
        out_dir=tmp / "partial",
        source={"test": "resume"},
        max_batches=PARTIAL_BATCHES,
        progress=False,
    )
    run_ranks(worker, (str(tmp / "init"), str(tmp), str(digits16)), WORLD_SIZE, TIMEOUT_S)
    results = load_rank_results(tmp, WORLD_SIZE)
    for result in results:
        result["dir"] = tmp
    return results


def test_rank_zero_alone_gets_the_bank_equal_to_the_one_rank_bank_each_row_once(
    rank_results: list[dict[str, Any]], sequential_bank: FeatureStore
) -> None:
    rank0, rank1 = rank_results
    reference = torch.from_numpy(np.asarray(sequential_bank.features))
    torch.testing.assert_close(rank0["fresh"], reference, rtol=1e-6, atol=1e-6)
    indices = rank0["fresh_written"].numpy()
    real = indices[indices >= 0]
    # Both ranks' rows, gathered on rank 0: every index exactly once; the padding (-1) was never written.
    assert real.size == 1618 and np.array_equal(np.sort(real), np.arange(1618))
    assert (indices < 0).sum() == 2 * 9 * 100 - 1618  # 809 real + 91 padded slots per rank
    # Rank 1 embedded its share but holds no row: the bank's length only, to size what rank 0 broadcasts.
    assert rank1["fresh"].shape == (1618, 0) and rank1["fresh_num_samples"] == 1618
    assert rank1["fresh_written"].numel() == 0
    on_disk = np.load(rank0["dir"] / "bank-fresh" / "features.npy", mmap_mode="r")
    np.testing.assert_allclose(on_disk, reference.numpy(), rtol=1e-6, atol=1e-6)


def test_two_ranks_continue_the_bank_rank_zero_left_unfinished(
    rank_results: list[dict[str, Any]], sequential_bank: FeatureStore
) -> None:
    rank0, rank1 = rank_results
    reference = torch.from_numpy(np.asarray(sequential_bank.features))
    torch.testing.assert_close(rank0["resumed"], reference, rtol=1e-6, atol=1e-6)
    # Rank 0 already holds the first rows on disk: both ranks read only the missing rows, which rank 0
    # writes, each exactly once; rank 1 is sent none of the bank.
    real = rank0["resumed_written"].numpy()
    real = real[real >= 0]
    assert real.size == 1618 - PARTIAL_BATCHES * 100 and np.unique(real).size == real.size
    assert rank1["resumed"].shape == (1618, 0) and rank1["resumed_written"].numel() == 0
    assert rank0["resumed_shape"] == rank1["resumed_shape"] == (1618, 8)
    bank = FeatureStore.open(rank0["dir"] / "partial")
    assert bank.meta.complete
    np.testing.assert_allclose(bank.features, reference.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(bank.labels, sequential_bank.labels)


def test_rank_zero_alone_evaluates_and_gets_the_one_process_figures(
    rank_results: list[dict[str, Any]], digits16: Path, tmp_path: Path
) -> None:
    single = evaluate(run_passes(digits16, tmp_path, DistributedEnv())).metrics()
    assert [result["eval_computed"] for result in rank_results] == [1, 0]
    for result in rank_results:  # rank 1 receives rank 0's figures
        assert result["eval"] == pytest.approx(single, abs=1e-6)
    assert single["knn_top1"] > 0.2 and single["nmi"] > 0.1  # figures of real features, not of nothing


def test_pcl_shuffled_keys_come_back_to_their_samples(rank_results: list[dict[str, Any]]) -> None:
    torch.manual_seed(0)
    pcl = PCL(TinyBackbone(), PCLConfig(hidden_dim=8, feat_dim=4, queue_length=30, num_clusters=(3,)))
    pcl.eval()
    with torch.no_grad():
        expected = pcl.key_encoder(global_images())
    got = torch.cat([result["pcl_keys"] for result in rank_results])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_pcl_queue_takes_every_ranks_real_keys(rank_results: list[dict[str, Any]]) -> None:
    keys = [result["pcl_keys"] for result in rank_results]
    newest = torch.cat([keys[0][:2], keys[1][:4]])
    for result in rank_results:
        before, after = result["pcl_queue_before"], result["pcl_queue"]
        assert after.shape == before.shape == (30, 4)  # 30 rounded to the global batch of 10
        torch.testing.assert_close(after[:6], newest)
        torch.testing.assert_close(after[6:], before[:-6])
    torch.testing.assert_close(rank_results[0]["pcl_queue"], rank_results[1]["pcl_queue"])


def test_deepcluster_v2_memory_takes_every_ranks_rows(rank_results: list[dict[str, Any]]) -> None:
    expected = torch.zeros(2, 20, 3)
    for result in rank_results:
        index, embeddings = result["dc2_index"], result["dc2_embeddings"]
        real = index >= 0
        expected[:, index[real]] = embeddings[:, real]
    for result in rank_results:
        torch.testing.assert_close(result["dc2_memory"], expected)


class _WaitingContext:
    """The parts of a TrainContext ``cluster_on_rank_zero`` uses, waiting as the trainer's RunContext
    does: on a group of its own with a long timeout."""

    def __init__(self, rank: int, group: Any) -> None:
        self.rank, self.group, self.logged = rank, group, []

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.logged.append(metrics)

    def on_rank_zero(self, work: Any, *, what: str) -> Any:
        from clusterssl.pipeline.train.world import on_rank0

        return on_rank0(DistributedEnv(rank=self.rank, world_size=2), work, group=self.group, what=what)


def _slow_clustering_worker(rank: int, init_file: str, out_dir: str, fail: bool) -> None:
    import time

    from clusterssl.errors import PipelineError
    from clusterssl.models.rank_zero import cluster_on_rank_zero
    from clusterssl.pipeline.train.world import waiting_group

    # the default group gives up after 3 s; rank 0 clusters for 5
    with gloo_process_group(rank, init_file, world_size=2, timeout_s=3):
        ctx = _WaitingContext(rank, waiting_group(DistributedEnv(rank=rank, world_size=2), timeout_s=120))
        table = torch.zeros(4, dtype=torch.long)

        def cluster() -> dict[str, float]:
            time.sleep(5)
            if fail:
                raise ValueError("k-means ran out of memory")
            table.copy_(torch.arange(4) + 7)
            return {"clustering/nmi": 0.5}

        try:
            cluster_on_rank_zero(ctx, cluster, [table])
            outcome = "ok"
        except (PipelineError, ValueError) as error:
            outcome = str(error)
        torch.save(
            {"table": table, "logged": ctx.logged, "outcome": outcome}, Path(out_dir) / f"rank{rank}.pt"
        )


@pytest.mark.parametrize("fail", [False, True])
def test_ranks_wait_out_a_clustering_longer_than_a_step_timeout(tmp_path: Path, fail: bool) -> None:
    """Rank 0's clustering outlasts the default group's timeout: the other rank waits on the waiting
    group and gets the table; when rank 0 fails, it stops with one line naming the clustering."""
    run_ranks(
        _slow_clustering_worker, (str(tmp_path / "init"), str(tmp_path), fail), world_size=2, timeout_s=120
    )
    rank0, rank1 = load_rank_results(tmp_path, 2)
    if fail:
        assert rank0["outcome"] == "k-means ran out of memory"
        assert rank1["outcome"] == "rank 0 failed during the clustering: k-means ran out of memory"
        return
    assert rank0["outcome"] == rank1["outcome"] == "ok"
    assert rank0["table"].tolist() == rank1["table"].tolist() == [7, 8, 9, 10]
    assert rank0["logged"] == [{"clustering/nmi": 0.5}] and rank1["logged"] == []
