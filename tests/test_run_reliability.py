"""A run under stress: a full disk while checkpointing, two runs on one directory, a lost tracking
store, a signal to the whole process group, a tampered checkpoint, a resume after SIGKILL."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import invoke, one_error_line
from trainer_helpers import tiny_config, write_config

from clusterssl.errors import PipelineError
from clusterssl.pipeline.train.checkpoint import atomic_save, load_checkpoint

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
