"""A training step reads nothing back from the device: every method, through the real trainer; nor do
the torch loader's pixel ops when they run on the device.

On a GPU each ``.item()``, ``bool(tensor)``, ``float(tensor)``, ``.tolist()``, ``.cpu()`` or ``.numpy()``
makes the CPU wait until the GPU has finished the work queued so far. The test counts these host reads
while the trainer runs its steps and logs (the loader, the epoch-start extraction and clustering, the
checkpoint and the end of the run are not counted), and checks that doubling the number of steps adds
reads in proportion to the number of log points, not to the number of steps.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from loader_fixtures import make_shard_set
from trainer_helpers import tiny_config

from clusterssl.errors import PipelineError
from clusterssl.models.factory import METHODS
from clusterssl.pipeline.data import torch_backend
from clusterssl.pipeline.data.loader import build_loader
from clusterssl.pipeline.data.spec import MultiCropSpec
from clusterssl.pipeline.train import trainer as trainer_module
from clusterssl.pipeline.train.train_config import build_train_config

LOG_EVERY = 5
BATCH = 8
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
TRANSFERS = ("to",)
"""Tensor methods that send data to the device (``torch.tensor``/``torch.as_tensor`` are counted too)."""
READS_PER_LOG_POINT = 2
"""What a log point may read: the trainer needs one copy of the window's values."""


class HostReads:
    """Counts calls of the tensor methods in ``READS`` while counting is on and not paused."""

    def __init__(self) -> None:
        self.count = 0
        self.on = 0
        self.paused = 0

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def counting(self, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.on += 1
            try:
                return function(*args, **kwargs)
            finally:
                self.on -= 1

        return wrapper

    def paused_during(self, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.pause():
                return function(*args, **kwargs)

        return wrapper

    def counted(self, read: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(read)
        def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.on and not self.paused:
                self.count += 1
            return read(tensor, *args, **kwargs)

        return wrapper


class PausedLoader:
    """A loader whose batches are produced with counting paused (augmentation is not a training step)."""

    def __init__(self, loader: Any, reads: HostReads) -> None:
        self.loader, self.reads = loader, reads

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        with self.reads.pause():
            iterator = iter(self.loader)
        while True:
            with self.reads.pause():
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
            yield batch


def host_reads(monkeypatch: pytest.MonkeyPatch, digits16: Path, out: Path, method: str, steps: int) -> int:
    """Host reads while ``method`` trains ``steps`` steps (one epoch) with a log point every LOG_EVERY."""
    method_settings = {
        "swav": {"queue_length": 4 * BATCH, "epoch_queue_starts": 0},  # the queue fills and is used
        "pcl": {"warmup_epochs": 0},  # ProtoNCE from the first step
        "deepcluster": {"uniform_sampling": False},  # repeats do not combine with samples_per_epoch
    }.get(method, {})
    raw = tiny_config(
        digits16,
        out,
        method,
        data={"val": None, "samples_per_epoch": steps * BATCH},
        trainer={"epochs": 1, "batch_size": BATCH, "log_every": LOG_EVERY, "threads": 1},
    )
    raw["method"].update(method_settings)
    trainer = trainer_module.Trainer(build_train_config(raw), progress=False)
    reads = HostReads()
    with monkeypatch.context() as patch:
        for name in READS:
            patch.setattr(torch.Tensor, name, reads.counted(getattr(torch.Tensor, name)))
        patch.setattr(trainer, "_train", reads.counting(trainer._train))
        for name in ("_save_checkpoint", "evaluate", "_finish"):
            patch.setattr(trainer, name, reads.paused_during(getattr(trainer, name)))
        for name in ("on_train_start", "on_epoch_start"):
            patch.setattr(trainer.method, name, reads.paused_during(getattr(trainer.method, name)))
        loader = trainer._loader
        patch.setattr(trainer, "_loader", lambda **kwargs: PausedLoader(loader(**kwargs), reads))
        summary = trainer.run()
    assert summary.steps == steps
    return reads.count


@pytest.mark.parametrize("method", sorted(METHODS))
def test_host_reads_grow_with_log_points_not_with_steps(
    monkeypatch: pytest.MonkeyPatch, digits16: Path, tmp_path: Path, method: str
) -> None:
    short = host_reads(monkeypatch, digits16, tmp_path / "short", method, steps=20)
    long = host_reads(monkeypatch, digits16, tmp_path / "long", method, steps=40)
    extra_log_points = (40 - 20) // LOG_EVERY
    assert short <= (20 // LOG_EVERY) * READS_PER_LOG_POINT
    assert long - short <= extra_log_points * READS_PER_LOG_POINT


def test_a_nonfinite_loss_stops_the_run_at_the_next_log_point_naming_its_step(
    digits16: Path, tmp_path: Path
) -> None:
    """The loss turns NaN at step 7: the log point of step 9 reads it, the run stops with the first bad
    step, metrics.jsonl holds the records of steps 0..6 only, and no checkpoint is written."""
    raw = tiny_config(
        digits16,
        tmp_path,
        "swav",
        data={"val": None, "samples_per_epoch": 20 * BATCH},
        trainer={"epochs": 1, "batch_size": BATCH, "log_every": LOG_EVERY, "threads": 1},
    )
    trainer = trainer_module.Trainer(build_train_config(raw), progress=False)
    forward = trainer.method.forward

    def poisoned(batch: Any, ctx: Any) -> Any:
        output = forward(batch, ctx)
        if ctx.step >= 7:
            output.loss = output.loss * float("nan")
        return output

    trainer.method.forward = poisoned  # type: ignore[method-assign]
    with pytest.raises(PipelineError, match=r"^the loss became nan at step 7; lower optim.lr"):
        trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "epoch" in record] == list(range(7))
    assert not (tmp_path / "checkpoint.pt").exists()


def test_the_loaders_device_pixel_ops_read_nothing_back_and_send_each_view_in_two_copies(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The torch backend's pixel ops on the device (here the CPU, standing in for a GPU): per view the
    uint8 crops and the packed parameters cross once each, the constants (normalisation, luma weights)
    only in the first batch, and nothing is read back, so the host never waits for the device."""
    spec = MultiCropSpec.preset("dino", global_size=24, local_size=12, num_local=2)  # blur and solarise
    shards = make_shard_set(tmp_path / "shards", 24, 8)
    loader = build_loader(shards, spec, 8, backend="torch", num_workers=0, device="cpu", pixel_ops="device")
    reads, transfers = HostReads(), HostReads()
    per_batch: list[tuple[int, int]] = []
    with monkeypatch.context() as patch:
        for name in READS:
            patch.setattr(torch.Tensor, name, reads.counted(getattr(torch.Tensor, name)))
        for name in TRANSFERS:
            patch.setattr(torch.Tensor, name, transfers.counted(getattr(torch.Tensor, name)))
        for name in ("tensor", "as_tensor"):
            patch.setattr(torch, name, transfers.counted(getattr(torch, name)))
        finish = torch_backend.finish_on_device
        patch.setattr(torch_backend, "finish_on_device", reads.counting(transfers.counting(finish)))
        for _ in loader:
            per_batch.append((reads.count, transfers.count))
    views = len(spec.views)
    assert len(per_batch) == 3 and all(count == 0 for count, _ in per_batch)
    totals = [0] + [count for _, count in per_batch]
    sent = list(np.diff(totals))
    constants = 3  # mean, std and the luma weights, made once for the device
    assert sent == [2 * views + constants, 2 * views, 2 * views]
