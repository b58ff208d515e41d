"""``clusterssl eval knn CHECKPOINT --train DATA --val DATA``: k-NN and k-means NMI/ARI of frozen features."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from clusterssl.tools.options import (
    backend_option,
    batch_size_option,
    device_option,
    emit,
    json_option,
    num_workers_option,
    tracking_options,
)


@click.group(name="eval")
def eval_group() -> None:
    """Evaluate frozen features of a trained backbone."""


@eval_group.command()
@click.argument("checkpoint")
@click.option(
    "--train",
    "train_data",
    required=True,
    help="Labelled reference shards (a directory, manifest, URLs, or `digits`).",
)
@click.option(
    "--val",
    "val_data",
    required=True,
    help="Labelled query shards (same forms; `digits` = the built-in hold-out).",
)
@click.option(
    "--train-manifest", help="manifest.json of --train when it is URLs with none next to them (pipe:, http)."
)
@click.option("--val-manifest", help="manifest.json of --val when it is URLs (see --train-manifest).")
@backend_option
@batch_size_option
@num_workers_option()
@click.option(
    "--k", "knn_k", type=click.IntRange(min=1), default=20, show_default=True, help="Neighbours that vote."
)
@click.option("--temperature", type=float, default=0.07, show_default=True, help="Vote weight exp(sim / T).")
@click.option(
    "--baseline", is_flag=True, help="Also evaluate the same architecture at random init, in the same run."
)
@device_option
@tracking_options
@json_option
def knn(
    checkpoint: str,
    train_data: str,
    val_data: str,
    train_manifest: str | None,
    val_manifest: str | None,
    backend: str,
    batch_size: int,
    num_workers: int,
    knn_k: int,
    temperature: float,
    baseline: bool,
    device: str,
    no_track: bool,
    tracking_uri: str | None,
    experiment: str | None,
    as_json: bool,
) -> None:
    """Weighted k-NN (DINO's protocol) of CHECKPOINT's features on --val against --train, and k-means
    (k = number of classes) NMI/ARI of the --val features. CHECKPOINT is a checkpoint.pt, a backbone.pt
    or a run directory."""
    from clusterssl.pipeline.features.evaluation import evaluate_checkpoint
    from clusterssl.pipeline.features.extraction import ExtractionSettings

    summary = evaluate_checkpoint(
        checkpoint,
        train_data,
        val_data,
        settings=ExtractionSettings(batch_size=batch_size, backend=backend, num_workers=num_workers),
        k=knn_k,
        temperature=temperature,
        baseline=baseline,
        device=device,
        track=not no_track,
        tracking_uri=tracking_uri,
        experiment=experiment,
        train_manifest=train_manifest,
        val_manifest=val_manifest,
    )
    emit(summary, as_json, _render)


def _render(summary: Mapping[str, Any]) -> str:
    lines = [
        f"{summary['checkpoint']}: {summary['num_val']} val samples against {summary['num_train']} train samples"
    ]
    lines.append(
        f"  trained      k-NN top-1 {summary['knn_top1']:.4f}   NMI {summary['nmi']:.4f}   ARI {summary['ari']:.4f}"
    )
    if "baseline" in summary:
        b = summary["baseline"]
        lines.append(
            f"  random init  k-NN top-1 {b['knn_top1']:.4f}   NMI {b['nmi']:.4f}   ARI {b['ari']:.4f}"
        )
    if summary.get("run_id"):
        lines.append(f"  MLflow run {summary['run_id']}")
    return "\n".join(lines)
