"""The run's ``metrics.jsonl``: one JSON record per line, each with the optimizer ``step`` it belongs to.

A run killed without a chance to checkpoint (SIGKILL, a node lost) has logged steps that its last
checkpoint does not hold; the resumed run computes them again. ``rewind_metrics`` drops those records so
every step appears once. The MLflow run cannot be rewound (it keeps every point logged); the tracker itself
says how far each of its metrics goes, and the resumed run logs only the points past that.

Two kinds of records share the file: the per-step loss, kept only here and marked by its ``epoch``, and
the records the trainer also sent to the tracker (windows, evaluations, a method's own), written here
after the tracker took them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clusterssl.pipeline.tracking.runs import Tracker

PER_STEP_KEY = "epoch"


def rewind_metrics(path: Path, step: int) -> None:
    """Keep the records of steps before ``step`` (the checkpoint's count of steps done) and drop the rest,
    including a line cut short by the kill."""
    if not path.exists():
        return
    kept: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            record_step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue  # half-written when the process died
        if record_step < step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


class RunRecords:
    """Where a run's numbers go: every record to ``metrics.jsonl`` (main process only), the tracked ones to
    the MLflow run first, and the per-step losses kept in memory for the loss plot and the summary."""

    def __init__(self, path: Path, *, is_main: bool) -> None:
        self.path = path
        self.is_main = is_main
        self.tracker: Tracker | None = None
        self.tracked_through: dict[str, int] = {}
        """Per metric, the last step the resumed MLflow run holds (logged before a kill): not sent again."""
        self.losses: list[tuple[int, float]] = []

    def rewind(self, step: int) -> None:
        """Drop the file's records from ``step`` on: a resumed run is about to compute those steps again."""
        if self.is_main:
            rewind_metrics(self.path, step)

    def attach(self, tracker: Tracker, *, resumed: bool) -> None:
        """Send tracked records to ``tracker`` from now on; a resumed run's tracker says where it stopped."""
        self.tracker = tracker
        self.tracked_through = tracker.last_steps() if resumed else {}

    def log(self, metrics: Mapping[str, float], *, step: int) -> None:
        """A tracked record: to MLflow (the points it does not hold yet), then to the file."""
        if self.tracker is not None:
            fresh = {key: value for key, value in metrics.items() if step > self.tracked_through.get(key, -1)}
            if fresh:
                self.tracker.log_metrics(fresh, step=step)
        self._append([{"step": step, **metrics}])

    def record_losses(self, epoch: int, steps: list[int], losses: list[float]) -> None:
        """The per-step losses of ``epoch``: to the file and to memory, not to the tracker."""
        self._append(
            {"step": step, PER_STEP_KEY: epoch, "loss": loss}
            for step, loss in zip(steps, losses, strict=True)
        )
        self.losses.extend(zip(steps, losses, strict=True))

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None

    def _append(self, records: Iterable[Mapping[str, Any]]) -> None:
        if self.is_main:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)
