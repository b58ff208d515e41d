"""Benchmark: seconds of the linear probe (penalty search + refit) on features of a given size, on a CPU.

Data: a seeded Gaussian mixture, ``--samples`` training and ``--samples // 6`` evaluation points in
``--dim`` dimensions around ``--classes`` centres (N(0, I) centres, N(0, sigma^2 I) noise), the shape of
a 512-d backbone's features of Fashion-MNIST by default. Prints the seconds and the top-1 reached, and
as the baseline, scikit-learn's ``LogisticRegression`` (lbfgs, 100 iterations at most) fit once on the
same standardised training features at the penalty the probe chose: the one fit a user of scikit-learn
would run, against the probe's whole penalty search and refit.

    python -m clusterssl.tools.bench_linear [--json]
    clusterssl bench linear [--json]
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import click
import numpy as np
import torch

from clusterssl.tools.options import emit, json_option


def run_benchmark(
    samples: int, dim: int, classes: int, sigma: float, threads: int | None, device: str = "cpu"
) -> dict[str, Any]:
    from clusterssl.pipeline.features.linear_probe import linear_probe

    if threads is not None:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (classes, dim))

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, classes, count)
        return (centres[labels] + rng.normal(0, sigma, (count, dim))).astype(np.float32), labels

    train, val = draw(samples), draw(samples // 6)
    started = time.perf_counter()
    result = linear_probe(*train, *val, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "device": device,
        "samples": samples,
        "dim": dim,
        "classes": classes,
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 2),
        "top1": result.top1,
        "weight_decay": result.weight_decay,
        "penalties_tried": len(result.holdout_top1),
        "baseline": sklearn_one_fit(train, val, result.weight_decay),
    }


def sklearn_one_fit(
    train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], weight_decay: float
) -> dict[str, Any]:
    """scikit-learn's multinomial logistic regression at one penalty. Its objective is the mean
    cross-entropy plus |W|^2 / (2 C n), so C = 1 / (weight_decay n) is the probe's penalty."""
    from sklearn.linear_model import LogisticRegression

    mean, spread = train[0].mean(axis=0), train[0].std(axis=0)
    scale = np.where(spread > 1e-6, spread, 1.0)
    train_x, val_x = (train[0] - mean) / scale, (val[0] - mean) / scale
    started = time.perf_counter()
    model = LogisticRegression(C=1.0 / (weight_decay * len(train_x)), max_iter=100).fit(train_x, train[1])
    return {
        "name": "scikit-learn LogisticRegression, one fit",
        "seconds": round(time.perf_counter() - started, 2),
        "top1": float((model.predict(val_x) == val[1]).mean()),
    }


def render(summary: Mapping[str, Any]) -> str:
    return (
        f"linear probe on {summary['samples']} x {summary['dim']} features, {summary['classes']} classes, "
        f"{summary['device']} ({summary['threads']} CPU thread(s)): {summary['seconds']:.1f} s for {summary['penalties_tried']} "
        f"penalties and the refit (top-1 {summary['top1']:.4f}, weight decay {summary['weight_decay']:g})\n"
        f"baseline, {summary['baseline']['name']} at that penalty: {summary['baseline']['seconds']:.1f} s "
        f"(top-1 {summary['baseline']['top1']:.4f})"
    )


@click.command()
@click.option("--samples", type=click.IntRange(min=12), default=60_000, show_default=True)
@click.option("--dim", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--classes", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--sigma", type=float, default=8.0, show_default=True, help="Noise around each class centre.")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's own).")
@click.option("--device", default="cpu", show_default=True, help="Where to solve: cpu, cuda, cuda:1…")
@json_option
def main(
    samples: int, dim: int, classes: int, sigma: float, threads: int | None, device: str, as_json: bool
) -> None:
    """Seconds of `eval linear`'s probe on SAMPLES x DIM features."""
    emit(run_benchmark(samples, dim, classes, sigma, threads, device), as_json, render)


if __name__ == "__main__":
    main()
