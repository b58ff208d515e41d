"""``clusterssl eval knn|linear CHECKPOINT --train DATA --val DATA``: k-NN, linear probe and k-means NMI/ARI
of frozen features."""

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
        + _linear_text(summary)
    )
    if "baseline" in summary:
        b = summary["baseline"]
        lines.append(
            f"  random init  k-NN top-1 {b['knn_top1']:.4f}   NMI {b['nmi']:.4f}   ARI {b['ari']:.4f}"
            + _linear_text(b)
        )
    if summary.get("run_id"):
        lines.append(f"  MLflow run {summary['run_id']}")
    return "\n".join(lines)


def _linear_text(metrics: Mapping[str, Any]) -> str:
    return f"   linear top-1 {metrics['linear_top1']:.4f}" if "linear_top1" in metrics else ""


def _linear(map_path: str | None, **options: Any) -> None:
    """Fit a linear classifier (softmax regression, L-BFGS) on CHECKPOINT's frozen features of --train,
    its L2 penalty chosen on a hold-out split of --train (never on --val), and report its top-1 on --val,
    beside k-NN (k = 20) and NMI/ARI. Draws the --val features' t-SNE map (logged with the run; --map
    keeps a copy). CHECKPOINT is a checkpoint.pt, a backbone.pt or a run directory."""
    from clusterssl.pipeline.features.evaluation import evaluate_checkpoint
    from clusterssl.pipeline.features.extraction import ExtractionSettings

    as_json = options.pop("as_json")
    settings = ExtractionSettings(
        batch_size=options.pop("batch_size"),
        backend=options.pop("backend"),
        num_workers=options.pop("num_workers"),
    )
    summary = evaluate_checkpoint(
        options.pop("checkpoint"),
        options.pop("train_data"),
        options.pop("val_data"),
        settings=settings,
        track=not options.pop("no_track"),
        map_path=map_path,
        **options,
    )
    emit(summary, as_json, _render_linear)


def _render_linear(summary: Mapping[str, Any]) -> str:
    probe = summary["linear_probe"]
    tried = ", ".join(f"{wd}: {acc:.4f}" for wd, acc in probe["holdout_top1"].items())
    return "\n".join(
        [
            f"linear top-1 {summary['linear_top1']:.4f} on {probe['num_val']} val samples "
            f"(weight decay {probe['weight_decay']:g}, chosen on a hold-out of --train: {tried}; "
            f"{probe['seconds']:.1f} s)",
            _render(summary),
        ]
    )


# `eval linear` takes `eval knn`'s data, loader, device and tracking options (not its vote settings)
linear = click.Command(
    "linear",
    callback=_linear,
    params=[
        *(p for p in knn.params if p.name not in ("knn_k", "temperature")),
        click.Option(
            ["--map", "map_path"], help="Also save the t-SNE map of the --val features to this PNG."
        ),
    ],
    help=_linear.__doc__,
    short_help="Linear probe of frozen features (and k-NN, NMI/ARI).",
)
eval_group.add_command(linear)
