"""``clusterssl demo``: the whole pipeline on the built-in digits, on a CPU, offline, in a few minutes.

For each method: convert the digits once (DATA_DIR/digits/{train,val}), pretrain with the method's digits
config on a short schedule, extract the training set's features, cluster them, and evaluate k-NN and
NMI on the hold-out — each method one MLflow pipeline run with a child run per stage. Re-running skips
what is already done. Ends with a table (method, k-NN, NMI, time) and how to open the MLflow UI.

``--data fashion-mnist`` runs the same pipeline on Fashion-MNIST from the IDX files of Debian's
``dataset-fashion-mnist`` (or ``$CLUSTERSSL_FASHION_MNIST``): 60,000 training images, evaluated on the
10,000 test images, for the methods that have a ``<method>_fashion`` config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from clusterssl.tools.options import emit, json_option

DEMO_METHODS = ("swav", "dino", "deepcluster", "pcl", "ibot")
DEFAULT_DEMO_METHODS = ("swav", "dino", "deepcluster", "pcl")
"""What `clusterssl demo` runs unless told: iBOT's ViT learns too slowly on 1,618 digits for a short demo."""
DEMO_EPOCHS = {"swav": 8, "dino": 16, "deepcluster": 8, "pcl": 8, "ibot": 8}
"""Short schedules so the four default methods finish in a few minutes on 2 cores (docs/results.md); the full
digits configs (configs/<method>_digits.yaml) train 25-40 epochs."""
DIGITS_AT_16_PX = "augment.global_size=16"
"""The digits are 8×8 images: 16 px crops keep every pixel and cost a quarter of 32 px's positions, so the
demo's ResNet methods train at 16 px (about twice as many images per second on 2 cores)."""
DEMO_SETTINGS: dict[str, tuple[str, ...]] = {
    "swav": (DIGITS_AT_16_PX,),
    # the config's rate (0.6) and crops (0.4-1 of the image) are for 30 epochs; a short run learns more
    # from a lower rate and harder crops
    "dino": (DIGITS_AT_16_PX, "optim.lr=0.3", "augment.global_scale=[0.25,1.0]"),
    "deepcluster": (DIGITS_AT_16_PX,),
    "pcl": (DIGITS_AT_16_PX, "trainer.batch_size=64"),  # twice the steps of the config's batch of 128
    "ibot": (),  # its ViT's patch grid is fixed at 32 px
}
"""Per method, what the digits demo changes in its ``<method>_digits`` config besides the epochs."""


FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` puts the IDX files; ``$CLUSTERSSL_FASHION_MNIST`` overrides."""
FASHION_DEMO_EPOCHS = 4
"""Fashion-MNIST epochs are 60,000 images (some six minutes each of SwAV on 2 cores, docs/results.md)."""


def fashion_mnist_dir() -> Path:
    """The Fashion-MNIST IDX directory, or a one-line error saying how to install it."""
    from clusterssl.errors import ShardsError

    root = Path(os.environ.get("CLUSTERSSL_FASHION_MNIST") or FASHION_MNIST_DIR)
    if not any(root.glob("train-images-idx3-ubyte*")) or not any(root.glob("t10k-images-idx3-ubyte*")):
        raise ShardsError(
            f"Fashion-MNIST is not in {root}: install it with 'apt-get install dataset-fashion-mnist' "
            "(Debian, Ubuntu), or set CLUSTERSSL_FASHION_MNIST to a directory of its train-* and t10k-* "
            "IDX files"
        )
    return root


def fashion_methods() -> list[str]:
    """The demo methods with a bundled ``<method>_fashion`` config."""
    from clusterssl.config import bundled_config_names

    names = set(bundled_config_names())
    return [m for m in DEMO_METHODS if f"{m}_fashion" in names]


def demo_convert_section(data: str, data_dir: Path) -> dict[str, Any]:
    """The convert stage of ``data``: the built-in digits with a 10% hold-out, or Fashion-MNIST's IDX
    files with their own test set."""
    if data == FASHION_MNIST:
        return {
            "source": "idx",
            "path": str(fashion_mnist_dir()),
            "out": str(data_dir / FASHION_MNIST),
            "holdout": None,
            "samples_per_shard": 1000,
        }
    return {"source": "digits", "out": str(data_dir / "digits"), "holdout": 0.1, "samples_per_shard": 256}


def demo_pipeline(
    method: str, data_dir: Path, workdir: Path, epochs: int | None, track: bool, data: str = "digits"
) -> Any:
    from clusterssl.config import from_dict
    from clusterssl.pipeline.runner import PipelineConfig

    fashion = data == FASHION_MNIST
    default_epochs = FASHION_DEMO_EPOCHS if fashion else DEMO_EPOCHS[method]
    run = f"{method}-fashion" if fashion else method
    return from_dict(
        PipelineConfig,
        {
            "name": f"demo-{run}",
            "workdir": str(workdir / run),
            "num_workers": 1,
            "convert": demo_convert_section(data, data_dir),
            "pretrain": {
                "config": f"{method}_{'fashion' if fashion else 'digits'}",
                "overrides": [
                    f"trainer.epochs={epochs or default_epochs}",
                    "trainer.eval_every=0",
                    *(() if fashion else DEMO_SETTINGS[method]),
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
    help=f"Comma-separated methods to run (swav, dino, deepcluster, pcl, ibot); default: "
    f"{','.join(DEFAULT_DEMO_METHODS)} on the digits, every method with a Fashion-MNIST config there.",
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
@click.option(
    "--data",
    type=click.Choice(["digits", FASHION_MNIST]),
    default="digits",
    show_default=True,
    help="The built-in digits, or Fashion-MNIST from Debian's dataset-fashion-mnist package.",
)
@click.option("--no-track", is_flag=True, help="Run without MLflow tracking.")
@json_option
def demo(
    methods: str | None,
    epochs: int | None,
    data_dir: Path,
    workdir: Path,
    data: str,
    no_track: bool,
    as_json: bool,
) -> None:
    """Run the built-in demo: digits → shards → pretrain → extract → cluster → evaluate, per method."""
    from clusterssl.errors import ModelError
    from clusterssl.pipeline.runner import check_single_process, run_pipeline

    check_single_process()
    if data == FASHION_MNIST:
        fashion_mnist_dir()  # not installed: say so before anything runs
    known = fashion_methods() if data == FASHION_MNIST else list(DEMO_METHODS)
    default = known if data == FASHION_MNIST else list(DEFAULT_DEMO_METHODS)
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else default
    unknown = [m for m in chosen if m not in known]
    if unknown or not chosen:
        what = "no Fashion-MNIST config for method(s)" if data == FASHION_MNIST else "unknown demo method(s)"
        raise ModelError(f"{what} {', '.join(unknown) or '(none)'}; known: {', '.join(known) or '(none)'}")
    rows = []
    tracking_uri = experiment_id = None
    for method in chosen:
        if not as_json:
            click.echo(f"== {method}", err=True)
        summary = run_pipeline(
            demo_pipeline(method, data_dir, workdir, epochs, not no_track, data), progress=not as_json
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
    # The digits demo runs share one backbone, seed and input size, so one floor row usually serves every
    # method; a method trained on another backbone or size gets its own row, since its floor is another's.
    for (knn, nmi), methods in floors.items():
        label = "random init" if len(floors) == 1 else f"random init: {','.join(methods)}"
        lines.append(f"{label:<15} {knn:>10.4f} {nmi:>7.4f}   (same backbone, untrained)")
    uri = summary["tracking_uri"]
    if uri:
        from clusterssl.pipeline.tracking.runs import ui_hint

        hint = ui_hint(uri, summary.get("experiment_id"))
        lines += ["", "Browse the runs (one pipeline run per method, a child run per stage):", f"  {hint}"]
    return "\n".join(lines)
