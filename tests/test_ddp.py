"""Data-parallel training on the CPU (gloo): two processes equal one process over the same global batch,
and `torchrun … clusterssl train` finishes on uneven shards (a timeout guards against a hang)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import gloo_process_group, run_ranks
from fakes import FakeContext, random_batch
from torch import nn
from trainer_helpers import digits_dir, step_losses, tiny_config, write_config

from clusterssl.models.factory import build_method
from clusterssl.models.types import Batch
from clusterssl.pipeline.train.optim import OptimizerStep

WORLD_SIZE = 2
GLOBAL_BATCH = 8
STEPS = 3
TIMEOUT_S = 180
METHODS = {
    # hidden_dim 0: a linear projection (no BatchNorm, whose per-rank statistics would differ; SyncBN
    # needs GPUs); no frozen prototypes and no queue, so every step exercises the distributed Sinkhorn.
    "swav": {"hidden_dim": 0, "feat_dim": 8, "num_prototypes": 6, "freeze_prototypes_niters": 0},
    "dino": {"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8, "freeze_last_layer": 0},
}
BACKBONE = ("vit_tiny_p4", {"depth": 1, "dim": 16, "num_heads": 2})


def make_method(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_method(name, BACKBONE[0], METHODS[name], BACKBONE[1])


def global_batches() -> list[Batch]:
    return [random_batch(GLOBAL_BATCH, sizes=(16, 16, 8, 8), seed=step) for step in range(STEPS)]


def rank_share(batch: Batch, rank: int) -> Batch:
    share = GLOBAL_BATCH // WORLD_SIZE
    rows = slice(rank * share, (rank + 1) * share)
    return Batch([v[rows] for v in batch.views], None, batch.index[rows], batch.num_global)


def run_steps(method: nn.Module, model: nn.Module, batches: list[Batch]) -> list[float]:
    """The trainer's step path (OptimizerStep, then on_step_end) over ``batches``; returns the losses."""
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9)
    step = OptimizerStep(optimizer)
    losses = []
    for number, batch in enumerate(batches):
        ctx = FakeContext(step=number, epochs=1, steps_per_epoch=STEPS)
        output = model(batch, ctx)
        step(output.loss, method, ctx)
        method.on_step_end(ctx)
        losses.append(output.loss.detach())
    return [float(loss) for loss in losses]


def ddp_worker(rank: int, init_file: str, out_dir: str, name: str) -> None:
    with gloo_process_group(rank, init_file, WORLD_SIZE, TIMEOUT_S):
        method = make_method(name)
        model = nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
        losses = torch.tensor(run_steps(method, model, [rank_share(b, rank) for b in global_batches()]))
        dist.all_reduce(losses)  # each rank's loss is its local mean: the global mean is their average
        if rank == 0:
            torch.save(
                {"losses": losses / WORLD_SIZE, "state": method.state_dict()}, Path(out_dir) / "ddp.pt"
            )


@pytest.mark.parametrize("name", ["swav", "dino"])
def test_two_ranks_equal_one_process_over_the_same_global_batch(name: str, tmp_path: Path) -> None:
    run_ranks(ddp_worker, (str(tmp_path / "init"), str(tmp_path), name), WORLD_SIZE, TIMEOUT_S)
    ddp: dict[str, Any] = torch.load(tmp_path / "ddp.pt", weights_only=True)
    method = make_method(name)
    single = run_steps(method, method, global_batches())
    torch.testing.assert_close(ddp["losses"], torch.tensor(single), rtol=1e-5, atol=1e-6)
    for key, value in method.state_dict().items():
        torch.testing.assert_close(ddp["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun is not installed",
)
def test_torchrun_trains_on_uneven_shards_and_resumes(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """1,618 samples in shards of 256 (the last one short) over 2 ranks × 1 worker: equal batch counts per
    rank, so no rank waits forever at a collective. Then a resume on the same world size continues."""
    root = digits_dir(tmp_path_factory.mktemp("cache"))
    config = tiny_config(
        root, tmp_path / "run", trainer={"epochs": 1, "batch_size": 100}, data={"num_workers": 1}
    )
    path = write_config(tmp_path / "cfg.yaml", config)
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "clusterssl.tools.cli",
        "train",
        str(path),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S * 2
    )
    assert first.returncode == 0, first.stderr[-3000:]
    # 1,618 / 2 ranks = 809 per rank → 9 batches of 100 (the last padded), counted once by rank 0
    assert sorted(step_losses(tmp_path / "run")) == list(range(9))
    assert (tmp_path / "run" / "checkpoint.rank1.pt").exists()
    write_config(path, {**config, "trainer": {**config["trainer"], "epochs": 2}})
    second = subprocess.run(
        [*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S * 2
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(step_losses(tmp_path / "run")) == list(range(18))


def resume_worker(rank: int, port: int, configs: list[dict[str, Any]], out_dir: str) -> None:
    """A rank of a 2-process torchrun-like world (env:// rendezvous) that builds a Trainer with --resume."""
    from clusterssl.errors import PipelineError
    from clusterssl.pipeline.train.train_config import build_train_config
    from clusterssl.pipeline.train.trainer import Trainer
    from clusterssl.pipeline.train.world import DistributedEnv, same_on_all_ranks

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    try:
        Trainer(build_train_config(configs[rank]), resume=True, progress=False)
        result["error"] = None
    except PipelineError as error:
        result["error"] = str(error)
    env, cpu = DistributedEnv.from_environment(), torch.device("cpu")
    result["same"] = same_on_all_ranks(env, [3, 7], cpu)
    result["different"] = same_on_all_ranks(env, [3, 7 + rank], cpu)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_ranks_that_see_different_checkpoints_refuse_to_resume(digits16: Path, tmp_path: Path) -> None:
    """Rank 0 finds a checkpoint in its output_dir, rank 1 (another node's local disk) finds none: both
    stop with the same one-line reason instead of rank 1 training from scratch beside resumed ranks."""
    from clusterssl.pipeline.train.train_config import build_train_config
    from clusterssl.pipeline.train.trainer import train

    no_eval = {"train": str(digits16 / "train"), "val": None}
    configs = [
        tiny_config(digits16, tmp_path / f"node{rank}", trainer={"epochs": 1, "device": "cpu"}, data=no_eval)
        for rank in range(WORLD_SIZE)
    ]
    train(build_train_config(configs[0]), progress=False)  # only node 0's directory holds checkpoint.pt
    run_ranks(resume_worker, (free_port(), configs, str(tmp_path)), WORLD_SIZE, TIMEOUT_S)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert [r["same"] for r in results] == [True, True]
    assert [r["different"] for r in results] == [False, False]
    assert "rank 0: epoch 1, step 7" in results[0]["error"] and "rank 1: none" in results[1]["error"]
    for result in results:
        assert "output_dir must be on storage all nodes share" in result["error"]
        assert "\n" not in result["error"]


def deepcluster_v2_worker(rank: int, port: int, root: str, out_dir: str) -> None:
    """A rank that trains DeepCluster-v2 for 2 epochs in one go, then for 1 epoch and resumed for 1 more."""
    from clusterssl.pipeline.train.train_config import build_train_config
    from clusterssl.pipeline.train.trainer import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)

    def config(run: str, epochs: int) -> Any:
        """A constant learning rate: the schedule of a 1-epoch run is then the 2-epoch run's first epoch."""
        trainer = {"epochs": epochs, "batch_size": 100, "device": "cpu", "threads": 1}
        optim = {"lr": 0.1, "min_lr": 0.1, "reference_batch_size": 200, "warmup_epochs": 0}
        tiny = tiny_config(Path(root), Path(out_dir) / run, "deepcluster_v2", trainer=trainer, optim=optim)
        return build_train_config({**tiny, "data": {**tiny["data"], "val": None}})

    train(config("reference", 2), progress=False)
    train(config("resumed", 1), progress=False)
    train(config("resumed", 2), resume=True, progress=False)
    dist.destroy_process_group()


def test_two_rank_deepcluster_v2_checkpoints_its_memory_once_and_resumes_exactly(
    digits16: Path, tmp_path: Path
) -> None:
    """The memory bank is the same on both ranks: only rank 0's checkpoint holds it (rank 1's file keeps
    its own buffers, BatchNorm statistics), and a run resumed from those files takes the same steps as one
    never stopped (18 = 2 epochs × 9 batches of 100 per rank over 1,618 samples)."""
    run_ranks(deepcluster_v2_worker, (free_port(), str(digits16), str(tmp_path)), WORLD_SIZE, TIMEOUT_S * 2)
    rank0 = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["method"]
    rank1 = torch.load(tmp_path / "resumed" / "checkpoint.rank1.pt", weights_only=True)["method"]
    assert rank0["memory"].shape == (2, 1618, 16) and rank0["sample_labels"].shape == (1618,)
    for name in ("memory", "memory_filled", "assignments", "sample_labels", "prototypes_0", "prototypes_1"):
        assert name in rank0 and name not in rank1, name
    assert any("running_mean" in name for name in rank1)  # the rank's own buffers are still there
    expected = step_losses(tmp_path / "reference")
    assert sorted(expected) == list(range(18))
    assert step_losses(tmp_path / "resumed") == expected
