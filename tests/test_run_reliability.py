"""A run under stress: a full disk while checkpointing, two runs on one directory, a lost tracking
store, a signal to the whole process group, a tampered checkpoint, a resume after SIGKILL."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cli_helpers import invoke, one_error_line
from trainer_helpers import pipeline_dict, tiny_config, write_config

from clusterssl.config import dump_yaml
from clusterssl.errors import PipelineError
from clusterssl.models.backbones import create_backbone
from clusterssl.pipeline.tracking.runs import ERROR_TAG
from clusterssl.pipeline.train.checkpoint import atomic_save, load_checkpoint, save_backbone
from clusterssl.pipeline.train.lock import LOCK_NAME, lock_directory
from clusterssl.pipeline.train.train_config import build_train_config

NO_VAL = {"val": None}


def _failing_save(fail_on_call: int, error: BaseException) -> Callable[..., None]:
    """A torch.save that works until call ``fail_on_call`` (1-based), which writes part of the file and
    then fails the way a full disk makes torch's zip writer fail."""
    real_save = torch.save
    calls = {"n": 0}

    def save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] != fail_on_call:
            return real_save(obj, handle, *args, **kwargs)
        handle.write(b"PK\x03\x04" + bytes(4096))  # a partial zip: what a writer leaves when the disk fills
        raise error

    return save


def _disk_full_errors() -> list[BaseException]:
    no_space = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    wrapped.__context__ = no_space
    return [no_space, wrapped]


@pytest.mark.parametrize("error", _disk_full_errors(), ids=["oserror", "zip-writer-runtimeerror"])
def test_a_full_disk_leaves_the_previous_checkpoint_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_save({"version": 1, "method": {"w": torch.ones(3)}}, path)
    monkeypatch.setattr(torch, "save", _failing_save(1, error))
    with pytest.raises(PipelineError) as raised:
        atomic_save({"version": 1, "method": {"w": torch.zeros(3)}}, path)
    message = str(raised.value)
    assert str(path) in message and "No space left on device" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert torch.equal(load_checkpoint(path)["method"]["w"], torch.ones(3))


def test_train_on_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(
    digits16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The epoch-1 checkpoint is written, the epoch-2 one hits a full disk: exit 2, one line."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", tiny_config(digits16, run, data=NO_VAL))
    monkeypatch.setattr(torch, "save", _failing_save(2, _disk_full_errors()[1]))
    line = one_error_line(invoke("train", str(config)))
    assert str(run / "checkpoint.pt") in line and "No space left on device" in line
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
    assert load_checkpoint(run / "checkpoint.pt")["position"]["epoch"] == 1


# ------------------------------------------------------------------------- one live run per directory


def _start_cli(*args: str, cwd: Path, new_session: bool = False) -> subprocess.Popen[str]:
    """``clusterssl ARGS…`` as a separate process (same interpreter and import path as the tests)."""
    return subprocess.Popen(
        [sys.executable, "-m", "clusterssl.tools.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def _wait_for_steps(process: subprocess.Popen[str], metrics: Path, steps: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and sum('"epoch"' in line for line in metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no {steps} steps logged: {process.communicate()[1][-3000:]}")


@contextmanager
def _held_by_another_process(directory: Path) -> Iterator[subprocess.Popen[str]]:
    """A separate Python process holding ``directory``'s lock until the block ends."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from clusterssl.pipeline.train.lock import lock_directory\n"
            "lock = lock_directory(sys.argv[1], owner='test', hint='wait')\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n",
            str(directory),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=60)


def test_the_lock_outlives_a_killed_holder_and_its_file_is_never_removed(tmp_path: Path) -> None:
    with (
        _held_by_another_process(tmp_path / "dir") as holder,
        pytest.raises(PipelineError, match=rf"dir is in use by another job \(pid {holder.pid}\); wait"),
    ):
        lock_directory(tmp_path / "dir", owner="job", hint="wait")
    # the holder was SIGKILLed: the kernel dropped its lock, the file stays for the next run
    with lock_directory(tmp_path / "dir", owner="job", hint="wait") as lock:
        assert lock.held
    assert (tmp_path / "dir" / LOCK_NAME).exists()


def _lock_on_two_ranks(rank: int, init_file: str, directory: str, out_dir: str) -> None:
    """A rank of a 2-process gloo world asking for ``directory``'s lock; writes its refusal (or "")."""
    from distributed_helpers import gloo_process_group

    from clusterssl.pipeline.train.world import DistributedEnv

    with gloo_process_group(rank, init_file, 2, 120):
        try:
            lock_directory(
                directory, owner="training", hint="wait", env=DistributedEnv(rank=rank, world_size=2)
            )
            refusal = ""
        except PipelineError as error:
            refusal = str(error)
        (Path(out_dir) / f"rank{rank}.txt").write_text(refusal)


def test_under_torchrun_every_rank_follows_rank_0s_decision(tmp_path: Path) -> None:
    from distributed_helpers import run_ranks

    directory = tmp_path / "run"

    def refusals(attempt: str) -> list[str]:
        out = tmp_path / attempt
        out.mkdir()
        run_ranks(_lock_on_two_ranks, (str(tmp_path / f"{attempt}.init"), str(directory), str(out)), 2, 180)
        return [(out / f"rank{rank}.txt").read_text() for rank in range(2)]

    with _held_by_another_process(directory) as holder:
        held = refusals("held")
    assert (
        held[0] == f"{directory} is in use by another training (pid {holder.pid}); wait for it to end or wait"
    )
    assert held[1] == f"{directory} is in use by another training (refused on rank 0); wait"
    assert refusals("free") == ["", ""]


def test_a_second_training_into_a_live_output_dir_is_refused(digits16: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = write_config(
        tmp_path / "cfg.yaml", tiny_config(digits16, run, trainer={"epochs": 50}, data=NO_VAL)
    )
    first = _start_cli("train", str(config), cwd=tmp_path)
    try:
        _wait_for_steps(first, run / "metrics.jsonl", 1)
        second = subprocess.run(
            [sys.executable, "-m", "clusterssl.tools.cli", "train", str(config)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        first.send_signal(signal.SIGTERM)
        _, first_stderr = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert lines == [f"Error: {run} is in use by another training (pid {first.pid}); wait for it to end or "
                     "choose another --set trainer.output_dir=…"]  # fmt: skip
    assert first.returncode == 130, first_stderr[-3000:]


def test_extract_into_a_bank_dir_in_use_is_refused(digits16: Path, tmp_path: Path) -> None:
    config = build_train_config(tiny_config(digits16, tmp_path / "run"))
    backbone = create_backbone(config.model.backbone, **config.model.backbone_kwargs)
    checkpoint = save_backbone(backbone, dump_yaml(config), tmp_path / "backbone.pt")
    bank = tmp_path / "bank"
    with _held_by_another_process(bank) as holder:
        result = invoke(
            "extract", str(checkpoint), str(digits16 / "val"), "--out", str(bank), "--num-workers", "0"
        )
    line = one_error_line(result)
    assert (
        line
        == f"Error: {bank} is in use by another extraction (pid {holder.pid}); wait for it to end or choose another --out"
    )
    assert sorted(p.name for p in bank.iterdir()) == [LOCK_NAME]


def test_a_second_pipeline_run_on_a_workdir_in_use_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(pipeline_dict(tmp_path)))
    workdir = tmp_path / "work"
    with _held_by_another_process(workdir) as holder:
        line = one_error_line(invoke("run", str(config), "--no-track"))
    assert line.startswith(f"Error: {workdir} is in use by another pipeline run (pid {holder.pid});")
    assert sorted(p.name for p in workdir.iterdir()) == [LOCK_NAME]


# ----------------------------------------------------------------------------------- a lost tracking store


def test_a_run_whose_artifact_uploads_fail_still_ends_finished_and_says_tracking_was_lost(
    digits16: Path, tmp_path: Path
) -> None:
    """Artifacts go to a directory that cannot be created (under a regular file): the first upload fails
    and tracking switches itself off, but the run is ended, tagged, and the summary says so."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    MlflowClient(uri).create_experiment("lost", artifact_location=(blocker / "mlruns").as_uri())
    tracked = {"enabled": True, "uri": uri, "experiment": "lost", "system_metrics": False}
    config = write_config(
        tmp_path / "cfg.yaml",
        tiny_config(digits16, tmp_path / "run", trainer={"epochs": 1}, data=NO_VAL, tracking=tracked),
    )
    result = invoke("train", str(config), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tracking_error"].startswith("uploading config.yaml failed")
    run = MlflowClient(uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[ERROR_TAG] == summary["tracking_error"]


# ----------------------------------------------------------------------- a signal to the process group


def test_sigterm_to_the_whole_process_group_checkpoints_and_exits_130(digits16: Path, tmp_path: Path) -> None:
    """Slurm's scancel signals every process of the job, loader workers included: the workers leave the
    signal to the trainer, which finishes its step, checkpoints and exits 130."""
    run = tmp_path / "run"
    config = write_config(
        tmp_path / "cfg.yaml",
        tiny_config(digits16, run, trainer={"epochs": 50}, data={**NO_VAL, "num_workers": 1}),
    )
    process = _start_cli("train", str(config), cwd=tmp_path, new_session=True)
    try:
        _wait_for_steps(process, run / "metrics.jsonl", 2)
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    assert load_checkpoint(run / "checkpoint.pt")["position"]["step"] >= 2


# --------------------------------------------------------------------- files and errors from elsewhere


def _checkpoint_with_config(path: Path, config_yaml: str, **extra: Any) -> Path:
    """A backbone.pt whose embedded config is ``config_yaml`` (as a tampered or foreign file would be)."""
    torch.save({"version": 1, "kind": "backbone", "config": config_yaml, "state_dict": {}, **extra}, path)
    return path


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (
            lambda config: "!!python/object/apply:os.system ['true']\n",
            "cannot parse the config in ",  # then the path and YAML's reason, on the same line
        ),
        (
            lambda config: yaml.safe_dump(
                {**config, "model": {"backbone": "vit_tiny_p4", "backbone_kwargs": {"dim": 200000}}}
            ),
            "backbone 'vit_tiny_p4' option 'dim' must lie in (0, 8192], got 200000",
        ),
    ],
    ids=["yaml-tag", "absurd-vit"],
)
def test_a_checkpoints_config_is_checked_like_a_config_file(
    digits16: Path, tmp_path: Path, tamper: Callable[[dict[str, Any]], str], expected: str
) -> None:
    checkpoint = _checkpoint_with_config(
        tmp_path / "backbone.pt", tamper(tiny_config(digits16, tmp_path / "run"))
    )
    line = one_error_line(invoke("extract", str(checkpoint), "digits", "--out", str(tmp_path / "bank")))
    assert expected in line


def test_a_pickle_that_asks_for_code_is_refused_without_advice_to_load_it_anyway(
    digits16: Path, tmp_path: Path
) -> None:
    config = yaml.safe_dump(tiny_config(digits16, tmp_path / "run"))
    checkpoint = _checkpoint_with_config(tmp_path / "backbone.pt", config, hook=print)
    line = one_error_line(invoke("extract", str(checkpoint), "digits", "--out", str(tmp_path / "bank")))
    assert line.startswith(f"Error: refused to load {checkpoint}: unpickling it would import print")
    assert "weights_only" not in line and "trust" not in line


def test_a_user_error_in_a_loader_worker_reaches_the_user_as_its_one_line(
    digits16: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clusterssl.pipeline.data.loader import build_loader
    from clusterssl.pipeline.data.spec import MultiCropSpec
    from clusterssl.pipeline.data.torch_backend import BatchBuilder

    def unreadable(self: BatchBuilder, batch: int) -> None:
        raise PipelineError("shard-000003.tar is unreadable: truncated")

    monkeypatch.setattr(BatchBuilder, "build", unreadable)  # the forked worker inherits the patch
    loader = build_loader(digits16 / "val", MultiCropSpec.preset("eval"), 16, backend="torch", num_workers=1)
    with pytest.raises(PipelineError) as raised:
        next(iter(loader))
    assert str(raised.value) == "shard-000003.tar is unreadable: truncated"


def test_workers_that_ignore_sigterm_do_not_keep_the_process_from_exiting(digits16: Path) -> None:
    """A worker error's traceback kept until exit keeps the DataLoader iterator alive; its workers ignore
    SIGTERM, so unless the loader shut them down itself, the interpreter's exit would wait for them forever."""
    script = """
import sys
from clusterssl.errors import PipelineError
from clusterssl.pipeline.data.loader import build_loader
from clusterssl.pipeline.data.spec import MultiCropSpec
from clusterssl.pipeline.data.torch_backend import BatchBuilder

def unreadable(self, batch):
    raise PipelineError("unreadable")

BatchBuilder.build = unreadable
loader = build_loader(sys.argv[1], MultiCropSpec.preset("eval"), 16, backend="torch", num_workers=1)
try:
    next(iter(loader))
except PipelineError as error:
    kept = error
    print(error)
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(digits16 / "val")], capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout) == (0, "unreadable\n"), done.stderr[-3000:]


# ---------------------------------------------------------------------------------- resume after SIGKILL


def _step_of(line: str) -> tuple[int | None, str]:
    """The step of one metrics.jsonl line (None for a line cut short), and the line."""
    try:
        return int(json.loads(line)["step"]), line
    except (ValueError, KeyError, TypeError):
        return None, line


def test_after_sigkill_and_resume_every_step_is_logged_once(digits16: Path, tmp_path: Path) -> None:
    """Killed two or more steps past the epoch-1 checkpoint (step 7): the resumed run redoes those steps;
    metrics.jsonl and the MLflow run hold each step once. The kill can land between MLflow taking a point
    and metrics.jsonl recording it; the test makes that the case for every step past the checkpoint, so
    only the store can say which points it holds."""
    from mlflow import MlflowClient

    from clusterssl.pipeline.train.trainer import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = {"enabled": True, "uri": uri, "experiment": "kill", "system_metrics": False}
    run = tmp_path / "run"
    settings = tiny_config(
        digits16, run, trainer={"epochs": 3, "log_every": 1}, data=NO_VAL, tracking=tracked
    )
    process = _start_cli("train", str(write_config(tmp_path / "cfg.yaml", settings)), cwd=tmp_path)
    _wait_for_steps(process, run / "metrics.jsonl", 10)
    process.kill()
    process.wait(timeout=60)
    saved = load_checkpoint(run / "checkpoint.pt")["position"]["step"]
    records = [_step_of(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    whole = [(step, line) for step, line in records if step is not None]  # the kill can cut the last line
    assert max(step for step, _ in whole) > saved, "the kill must come after steps the checkpoint lacks"
    (run / "metrics.jsonl").write_text("".join(line + "\n" for step, line in whole if step < saved))

    summary = train(build_train_config(settings), resume=True, progress=False)
    assert summary.steps == 21
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_records = [r["step"] for r in records if "epoch" in r]
    assert step_records == list(range(21))
    history = MlflowClient(uri).get_metric_history(summary.run_id, "loss")
    assert sorted(point.step for point in history) == list(range(21))
