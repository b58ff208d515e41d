"""The conversion journal: what an interrupted conversion had finished, so a re-run only does the rest.

``.convert-journal.jsonl`` in a shard set's directory: a header line with the conversion's parameters,
then one line per completed shard (``ShardResult.to_json``), each appended and fsynced by the parent once
the shard sits under its final name. A line torn by a crash is ignored (its shard is simply rewritten).
The journal is removed once ``manifest.json`` has been written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

from clusterssl.shards.writer import ShardResult, fsync_directory

JOURNAL_NAME = ".convert-journal.jsonl"


def journal_path(directory: Path) -> Path:
    return directory / JOURNAL_NAME


def read_journal(directory: Path) -> tuple[dict[str, Any] | None, dict[int, ShardResult]]:
    """``(header params, completed shards by number)``; ``(None, {})`` when there is no usable journal."""
    path = journal_path(directory)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None, {}
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # only the line being written when the process died can be torn
    if not records or records[0].get("kind") != "header":
        return None, {}
    completed = {}
    for record in records[1:]:
        try:
            result = ShardResult.from_json(record)
        except (KeyError, TypeError, ValueError, IndexError):
            continue
        completed[result.number] = result
    return records[0].get("params"), completed


class Journal:
    """Append-only writer of a journal (the parent process is its only writer)."""

    def __init__(self, directory: Path, params: dict[str, Any], resume: bool) -> None:
        self.path = journal_path(directory)
        if resume:
            _drop_torn_tail(self.path)
        self._handle: TextIO = open(self.path, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115
        if not resume:
            self._append({"kind": "header", "params": params})
            fsync_directory(directory)

    def record(self, result: ShardResult) -> None:
        self._append({"kind": "shard", **result.to_json()})

    def _append(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line, so the next record starts on a line of its own."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
