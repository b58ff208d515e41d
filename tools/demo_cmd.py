"""``clusterssl demo``: the built-in end-to-end run on the CPU, offline.

For now: convert scikit-learn's digits into ``DATA_DIR/digits/{train,val}`` (a stratified 10% hold-out)
unless they are already there, and verify both sets. Later stages (train, evaluate) extend it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from tools.cli import emit, json_option
from tools.shards_cmd import default_workers

DEMO_HOLDOUT = 0.1
DEMO_SAMPLES_PER_SHARD = 256
"""Small shards, so the 1,618 training digits make 7 shards and several loader workers get a share."""


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("data"),
    show_default=True,
    help="Where the demo's shards go (DATA_DIR/digits/train and DATA_DIR/digits/val).",
)
@click.option("--workers", type=click.IntRange(min=1), default=default_workers, show_default="all CPUs")
@json_option
def demo(data_dir: Path, workers: int, as_json: bool) -> None:
    """Run the built-in demo: digits → shards (train/val) → verify."""
    from shards.convert import ConvertOptions, convert
    from shards.sources import DigitsSource
    from tools.shards_cmd import conversion_summary, verify_sets

    out = data_dir / "digits"
    outcome = convert(
        DigitsSource(),
        out,
        ConvertOptions(holdout=DEMO_HOLDOUT, samples_per_shard=DEMO_SAMPLES_PER_SHARD, workers=workers),
        progress=not as_json,
    )
    reports = verify_sets(out, workers=workers)
    summary = {
        "data": str(out),
        "convert": conversion_summary(outcome),
        "verify": {"ok": all(r.ok for r in reports), "sets": [r.to_json() for r in reports]},
    }
    emit(summary, as_json, _render)
    if not summary["verify"]["ok"]:
        raise SystemExit(1)


def _render(summary: Mapping[str, Any]) -> str:
    lines = ["digits → shards"]
    for s in summary["convert"]["sets"]:
        state = "already there" if s["status"] == "unchanged" else s["status"]
        lines.append(
            f"  {s['name']:5s} {s['count']:5d} samples, {s['shards']} shards, {s['bytes'] / 1e6:.1f} MB "
            f"in {s['directory']} ({state})"
        )
    verified = summary["verify"]
    for report in verified["sets"]:
        mark = "OK " if report["ok"] else "BAD"
        lines.append(
            f"  verify {mark} {report['directory']}: {report['count']} samples, {report['images_decoded']} "
            f"images decoded, {report['problem_count']} problem(s)"
        )
    return "\n".join(lines)
