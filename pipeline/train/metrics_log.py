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
from pathlib import Path

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
