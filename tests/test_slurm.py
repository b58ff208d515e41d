"""Slurm without torchrun: the rank layout read from srun's task variables, and two simulated tasks that
train as one process group, stop together on Slurm's pre-emption signal and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_helpers import step_losses, tiny_config, write_config

import clusterssl
from clusterssl.errors import PipelineError
from clusterssl.pipeline.train.slurm import PORT_BASE, expand_hostlist, is_slurm_step, slurm_layout
from clusterssl.pipeline.train.world import DistributedEnv

TIMEOUT_S = 300
PACKAGE_PARENT = Path(clusterssl.__file__).parents[1]


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("gpu7", ["gpu7"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a[9-11],b", ["a9", "a10", "a11", "b"]),
        ("rack[1-2]-n[0-1]", ["rack1-n0", "rack1-n1", "rack2-n0", "rack2-n1"]),
        ("x[008-010].cluster", ["x008.cluster", "x009.cluster", "x010.cluster"]),
    ],
)
def test_node_lists_expand_like_scontrol_show_hostnames(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["node[01-04", "node[a-b]", "a,,b"])
def test_unreadable_node_lists_are_one_line_errors(hostlist: str) -> None:
    with pytest.raises(PipelineError, match="cannot read the Slurm node list"):
        expand_hostlist(hostlist)


def test_the_layout_comes_from_the_task_variables_and_the_first_node() -> None:
    environ = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[12-15]",
        "SLURM_STEP_NODELIST": "gpu[13-14]",
    }
    layout = slurm_layout(environ)
    assert (layout.rank, layout.world_size, layout.local_rank) == (5, 8, 1)
    assert layout.master_addr == "gpu13", "the step's nodes, not the whole allocation's"
    assert layout.master_port == PORT_BASE + 123456 % 20000
    assert slurm_layout({**environ, "MASTER_ADDR": "head", "MASTER_PORT": "29400"}).master_addr == "head"
    assert slurm_layout({**environ, "MASTER_PORT": "29400"}).master_port == 29400


def test_torchrun_variables_win_over_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "n[1-2]"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert DistributedEnv.from_environment() == DistributedEnv(3, 4, 3, "n1", PORT_BASE)
    # `srun torchrun …`: one torchrun per node, and torchrun's numbering is the truth
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert not is_slurm_step(os.environ)
    assert DistributedEnv.from_environment() == DistributedEnv(6, 8, 2)


def test_a_multi_task_step_without_a_node_list_says_how_to_start_it() -> None:
    with pytest.raises(PipelineError, match="start the job with srun"):
        slurm_layout({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def slurm_task_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What srun gives task ``rank`` of a one-node step (torchrun's variables removed)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR") and not k.startswith("SLURM_")
    }
    env.update(
        SLURM_PROCID=str(rank),
        SLURM_NTASKS=str(world_size),
        SLURM_LOCALID=str(rank),
        SLURM_JOB_ID="4242",
        SLURM_STEP_NODELIST="127.0.0.[1]",
        MASTER_PORT=str(port),
        # the package under test, wherever this test run imports it from
        PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(PACKAGE_PARENT)])),
        OMP_NUM_THREADS="1",
    )
    return env


def start_tasks(command: list[str], cwd: Path, world_size: int = 2) -> list[subprocess.Popen[str]]:
    port = free_port()
    return [
        subprocess.Popen(
            command,
            cwd=cwd,
            env=slurm_task_env(rank, world_size, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world_size)
    ]


def finish(tasks: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    results = []
    for task in tasks:
        try:
            _, stderr = task.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in tasks:
                other.kill()
            pytest.fail("a Slurm task did not finish in time")
        results.append((task.returncode, stderr[-3000:]))
    return results


def test_two_slurm_tasks_train_stop_on_the_preemption_signal_and_resume(
    digits16: Path, tmp_path: Path
) -> None:
    """Two `srun`-style tasks (no torchrun) join one gloo group through the node list's first host: the
    shards are split between them as under torchrun (1,618 samples / 2 ranks / batch 100 = 9 steps per
    epoch). Slurm's `--signal=TERM@120` reaches every task: both checkpoint and exit 130, and the
    resubmitted job continues the same run, each step once."""
    config = tiny_config(
        digits16,
        tmp_path / "run",
        trainer={"epochs": 2, "batch_size": 100, "log_every": 1},
        data={"val": None},
    )
    path = write_config(tmp_path / "cfg.yaml", config)
    command = [sys.executable, "-m", "clusterssl", "train", str(path)]
    tasks = start_tasks(command, tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and len(step_losses(tmp_path / "run") if metrics.exists() else []) < 3:
        if any(task.poll() is not None for task in tasks):
            break
        time.sleep(0.05)
    for task in tasks:
        task.send_signal(signal.SIGTERM)
    results = finish(tasks)
    assert [code for code, _ in results] == [130, 130], results
    stopped_at = len(step_losses(tmp_path / "run"))
    assert 3 <= stopped_at < 18
    assert (tmp_path / "run" / "checkpoint.pt").exists()

    results = finish(start_tasks([*command, "--resume"], tmp_path))
    assert [code for code, _ in results] == [0, 0], results
    assert sorted(step_losses(tmp_path / "run")) == list(range(18))
