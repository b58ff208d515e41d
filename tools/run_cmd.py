"""``clusterssl run PIPELINE.yaml``: every stage in one command, one MLflow parent run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import click

from clusterssl.tools.options import emit, json_option, tracking_options, tracking_overrides


@click.command()
@click.argument("pipeline_config", metavar="PIPELINE.yaml")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a pipeline key, e.g. --set pretrain.overrides=[trainer.epochs=1].",
)
@tracking_options
@json_option
def run(
    pipeline_config: str,
    overrides: Sequence[str],
    no_track: bool,
    tracking_uri: str | None,
    experiment: str | None,
    as_json: bool,
) -> None:
    """Run convert → pretrain → extract → cluster → evaluate (a path, or a bundled name such as
    pipeline_digits). Stages whose outputs exist and match are skipped; an interrupted stage resumes.
    Under torchrun, pretrain and extract run on every rank, the other stages on rank 0."""
    from clusterssl.config import resolve_config_path
    from clusterssl.pipeline.runner import load_pipeline_config, run_pipeline
    from clusterssl.pipeline.train.world import DistributedEnv

    config = load_pipeline_config(
        resolve_config_path(pipeline_config),
        [*overrides, *tracking_overrides(no_track, tracking_uri, experiment)],
    )
    summary = run_pipeline(config, progress=not as_json)
    if DistributedEnv.from_environment().is_main:  # one summary per run, not one per rank
        emit(summary.to_json(), as_json, render_pipeline)
    if summary.interrupted:
        raise SystemExit(130)


def render_pipeline(summary: Mapping[str, Any]) -> str:
    lines = [
        f"pipeline {summary['name']}: {summary['seconds']:.0f} s"
        + (" (interrupted)" if summary["interrupted"] else "")
    ]
    for name, stage in summary["stages"].items():
        state = "skipped (outputs up to date)" if stage["skipped"] else f"ran in {stage['seconds']:.0f} s"
        lines.append(f"  {name:<9} {state}")
    evaluate = summary["stages"].get("evaluate", {}).get("outputs", {})
    if "knn_top1" in evaluate:
        lines.append(f"  k-NN top-1 {evaluate['knn_top1']:.4f}   NMI {evaluate['nmi']:.4f}")
    if summary.get("run_id"):
        from clusterssl.pipeline.tracking.runs import ui_hint

        lines.append(
            f"  MLflow parent run {summary['run_id']}  ({ui_hint(summary['tracking_uri'], summary.get('experiment_id'))})"
        )
        if summary.get("tracking_error"):
            lines.append(f"  tracking lost: {summary['tracking_error']}; the MLflow record is incomplete")
    return "\n".join(lines)
