"""Benchmark: seconds of the linear probe (penalty search + refit) on features of a given size, on a CPU.

Data: a seeded Gaussian mixture, ``--samples`` training and ``--samples // 6`` evaluation points in
``--dim`` dimensions around ``--classes`` centres (N(0, I) centres, N(0, sigma^2 I) noise), the shape of
a 512-d backbone's features of Fashion-MNIST by default. Prints the seconds and the top-1 reached.

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
    return {
        "device": device,
        "samples": samples,
        "dim": dim,
        "classes": classes,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 2),
        "top1": result.top1,
        "weight_decay": result.weight_decay,
        "penalties_tried": len(result.holdout_top1),
    }


def render(summary: Mapping[str, Any]) -> str:
    return (
        f"linear probe on {summary['samples']} x {summary['dim']} features, {summary['classes']} classes, "
        f"{summary['device']} ({summary['threads']} CPU thread(s)): {summary['seconds']:.1f} s for {summary['penalties_tried']} "
        f"penalties and the refit (top-1 {summary['top1']:.4f}, weight decay {summary['weight_decay']:g})"
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
