"""``clusterssl demo``: the whole pipeline on the built-in digits, on a CPU, offline, in a few minutes.

For each method: convert the digits once (DATA_DIR/digits/{train,val}), pretrain with the method's digits
config on a short schedule, extract the training set's features, cluster them, and evaluate k-NN and
NMI on the hold-out — each method one MLflow pipeline run with a child run per stage. Re-running skips
what is already done. Ends with a table (method, k-NN, NMI, time) and how to open the MLflow UI.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from clusterssl.tools.options import emit, json_option

DEMO_METHODS = ("swav", "dino", "deepcluster", "pcl", "ibot")
DEFAULT_DEMO_METHODS = ("swav", "dino", "deepcluster", "pcl")
"""What `clusterssl demo` runs unless told: iBOT's ViT learns too slowly on 1,618 digits for a short demo."""
DEMO_EPOCHS = {"swav": 8, "dino": 8, "deepcluster": 8, "pcl": 8, "ibot": 8}
"""Short schedules so the four default methods finish in a few minutes on 2 cores (measured: 609 CPU seconds
for the four, docs/results.md); the full digits configs (configs/<method>_digits.yaml) train 25-40 epochs."""


def demo_pipeline(method: str, data_dir: Path, workdir: Path, epochs: int | None, track: bool) -> Any:
    from clusterssl.config import from_dict
    from clusterssl.pipeline.runner import PipelineConfig

    return from_dict(
        PipelineConfig,
        {
            "name": f"demo-{method}",
            "workdir": str(workdir / method),
            "num_workers": 1,
            "convert": {
                "source": "digits",
                "out": str(data_dir / "digits"),
                "holdout": 0.1,
                "samples_per_shard": 256,
            },
            "pretrain": {
                "config": f"{method}_digits",
                "overrides": [
                    f"trainer.epochs={epochs or DEMO_EPOCHS[method]}",
                    "trainer.eval_every=0",
                ],
            },
            "cluster": {"k": [10]},
            "evaluate": {"baseline": True},
            "tracking": {"enabled": track, "experiment": "clusterssl-demo"},
        },
    )


@click.command()
@click.option(
    "--methods",
    default=",".join(DEFAULT_DEMO_METHODS),
    show_default=True,
    help="Comma-separated methods to run (swav, dino, deepcluster, pcl, ibot).",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), help="Pretraining epochs per method (default: a short schedule)."
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("data"),
    show_default=True,
    help="Where the digits shards go.",
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Where each method's stages write.",
)
@click.option("--no-track", is_flag=True, help="Run without MLflow tracking.")
@json_option
def demo(
    methods: str, epochs: int | None, data_dir: Path, workdir: Path, no_track: bool, as_json: bool
) -> None:
    """Run the built-in demo: digits → shards → pretrain → extract → cluster → evaluate, per method."""
    from clusterssl.errors import ModelError
    from clusterssl.pipeline.runner import check_single_process, run_pipeline

    check_single_process()
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in DEMO_METHODS]
    if unknown or not chosen:
        raise ModelError(
            f"unknown demo method(s) {', '.join(unknown) or '(none)'}; known: {', '.join(DEMO_METHODS)}"
        )
    rows = []
    tracking_uri = experiment_id = None
    for method in chosen:
        if not as_json:
            click.echo(f"== {method}", err=True)
        summary = run_pipeline(
            demo_pipeline(method, data_dir, workdir, epochs, not no_track), progress=not as_json
        )
        if summary.interrupted:
            raise SystemExit(130)
        tracking_uri, experiment_id = summary.tracking_uri, summary.experiment_id
        evaluate = summary.stages["evaluate"].record.outputs
        rows.append(
            {
                "method": method,
                "knn_top1": evaluate["knn_top1"],
                "nmi": evaluate["nmi"],
                "random_init_knn_top1": evaluate.get("random_init_knn_top1"),
                "random_init_nmi": evaluate.get("random_init_nmi"),
                "seconds": round(summary.seconds, 1),
                "run_id": summary.run_id,
            }
        )
    emit(
        {"methods": rows, "tracking_uri": tracking_uri, "experiment_id": experiment_id},
        as_json,
        render_demo_summary,
    )


def render_demo_summary(summary: Mapping[str, Any]) -> str:
    """The table: per method k-NN, NMI, their margins over the random-init floor, time; then the floor."""
    lines = ["", f"{'method':<15} {'k-NN top-1':>10} {'NMI':>7} {'Δ k-NN':>7} {'Δ NMI':>7} {'time':>7}"]
    floors: dict[tuple[float, float], list[str]] = {}
    for row in summary["methods"]:
        margins = f"{'':>7} {'':>7}"
        if row.get("random_init_knn_top1") is not None:
            floor = (row["random_init_knn_top1"], row["random_init_nmi"])
            floors.setdefault(floor, []).append(row["method"])
            margins = f"{row['knn_top1'] - floor[0]:>+7.3f} {row['nmi'] - floor[1]:>+7.3f}"
        lines.append(
            f"{row['method']:<15} {row['knn_top1']:>10.4f} {row['nmi']:>7.4f} {margins} {row['seconds']:>6.0f}s"
        )
    # The digits configs share one backbone and seed, so one floor row usually serves every method; a
    # method trained on another backbone gets its own row, since its floor is another network's.
    for (knn, nmi), methods in floors.items():
        label = "random init" if len(floors) == 1 else f"random init: {','.join(methods)}"
        lines.append(f"{label:<15} {knn:>10.4f} {nmi:>7.4f}   (same backbone, untrained)")
    uri = summary["tracking_uri"]
    if uri:
        from clusterssl.pipeline.tracking.runs import ui_hint

        hint = ui_hint(uri, summary.get("experiment_id"))
        lines += ["", "Browse the runs (one pipeline run per method, a child run per stage):", f"  {hint}"]
    return "\n".join(lines)
