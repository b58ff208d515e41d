"""The training progress bar: drawn on a terminal when asked for, silent otherwise (logs, pipes, --json)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from trainer_helpers import tiny_config

from clusterssl.pipeline.train.progress import EpochProgress, wants_progress
from clusterssl.pipeline.train.train_config import build_train_config
from clusterssl.pipeline.train.trainer import train


class Terminal(io.StringIO):
    """A stream that says it is an interactive terminal, to force the bar on."""

    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal_and_only_when_asked() -> None:
    assert wants_progress(True, Terminal())
    assert not wants_progress(False, Terminal())
    assert not wants_progress(True, io.StringIO())  # a log file or a pipe


def test_bar_shows_epoch_loss_and_rate_when_enabled() -> None:
    stream = Terminal()
    bar = EpochProgress(epoch=2, epochs=5, total=3, enabled=True, stream=stream, min_interval=0.0)
    for loss in (4.0, 3.5, 3.25):
        bar.show_loss(loss)
        bar.update(images=64)
    bar.close()
    text = stream.getvalue()
    assert "epoch 3/5" in text and "3/3" in text
    assert "loss=3.25" in text and "img/s=" in text


def test_disabled_bar_writes_nothing() -> None:
    stream = Terminal()
    bar = EpochProgress(epoch=0, epochs=1, total=2, enabled=False, stream=stream)
    bar.show_loss(1.0)
    bar.update(images=8)
    bar.close()
    assert stream.getvalue() == ""


@pytest.mark.parametrize("terminal", [False, True])
def test_training_draws_the_bar_only_on_a_terminal(
    digits16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    stderr = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    config = build_train_config(tiny_config(digits16, tmp_path / "run", trainer={"epochs": 2}))
    train(config, progress=True)
    text = stderr.getvalue()
    if terminal:
        assert "epoch 1/2" in text and "epoch 2/2" in text and "loss=" in text and "img/s=" in text
    else:
        assert "epoch 1/2" not in text and "loss=" not in text
