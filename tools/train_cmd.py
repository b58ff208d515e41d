"""``clusterssl train CONFIG.yaml [--set key=value …]``: pretrain a backbone, tracked in MLflow."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import click

from clusterssl.tools.options import emit, json_option, tracking_options, tracking_overrides


@click.command()
@click.argument("config", metavar="CONFIG.yaml")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key (repeatable), e.g. --set trainer.epochs=1 --set optim.lr=0.3.",
)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in trainer.output_dir.")
@tracking_options
@json_option
def train(
    config: str,
    overrides: Sequence[str],
    resume: bool,
    no_track: bool,
    tracking_uri: str | None,
    experiment: str | None,
    as_json: bool,
) -> None:
    """Pretrain a backbone with the method and data CONFIG.yaml names (a path, or a bundled config name
    such as swav_digits). Ends with a summary; --json prints it as one object (run_id, checkpoint,
    knn_top1, nmi, …)."""
    from clusterssl.pipeline.train.train_config import load_train_config
    from clusterssl.pipeline.train.trainer import train as run_training

    cfg = load_train_config(config, [*overrides, *tracking_overrides(no_track, tracking_uri, experiment)])
    summary = run_training(cfg, resume=resume, progress=not as_json)
    emit(summary.to_json(), as_json, render_train_summary)
    if summary.interrupted:
        raise SystemExit(130)


def render_train_summary(summary: Mapping[str, Any]) -> str:
    lines = [
        f"{'interrupted' if summary['interrupted'] else 'trained'}: {summary['epochs_done']} epoch(s), "
        f"{summary['steps']} steps in {summary['seconds']:.0f} s ({summary['images_per_s']:.0f} images/s)",
        f"  checkpoint  {summary['checkpoint']}",
    ]
    if summary.get("backbone"):
        lines.append(f"  backbone    {summary['backbone']}")
    if "knn_top1" in summary:
        lines.append(
            f"  k-NN top-1  {summary['knn_top1']:.4f}   NMI {summary['nmi']:.4f}   ARI {summary['ari']:.4f}"
        )
    if summary.get("run_id"):
        from clusterssl.pipeline.tracking.runs import ui_hint

        lines.append(
            f"  MLflow run  {summary['run_id']}  ({ui_hint(summary['tracking_uri'], summary.get('experiment_id'))})"
        )
        if summary.get("tracking_error"):
            lines.append(f"  tracking lost: {summary['tracking_error']}; the MLflow record is incomplete")
    if summary["interrupted"]:
        lines.append("  continue with: clusterssl train CONFIG --resume (same --set options)")
    return "\n".join(lines)
