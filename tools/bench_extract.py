"""Benchmark: the extraction pass against the bare forward pass of the same backbone, in one run.

The extraction pass (``pipeline.features.extraction.extract_features``: loader with the eval view, forward, rows
all-gathered and written into an on-disk bank by index, exactly-once check) is timed over the whole
shard set. The baseline is the same backbone's forward alone, over the same batches pre-loaded into
memory (the first ``--preload-batches`` of the pass's own loader, all of them by default) and already on
the device: the ceiling the pass would reach if reading, decoding and writing cost nothing. Both are the
best of ``--repeats`` runs after a warm-up; the ratio of their images/s is the figure (target >= 90%).

    clusterssl bench extract [DATA] [--backbone resnet18] [--size 32] [--json]
    python -m clusterssl.tools.bench_extract [DATA] …

DATA is a shard directory (or its manifest) or ``digits`` (the default: the built-in 1,618 training
digits at 32 px).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from clusterssl.tools.options import (
    backend_option,
    batch_size_option,
    device_option,
    emit,
    json_option,
    num_workers_option,
)


def run_benchmark(
    data: str,
    *,
    backbone: str,
    checkpoint: str | None,
    size: int | None,
    batch_size: int,
    num_workers: int,
    backend: str,
    device: str,
    repeats: int,
    preload_batches: int | None,
    threads: int | None,
) -> dict[str, Any]:
    import numpy as np
    import torch

    from clusterssl.models.backbones import create_backbone
    from clusterssl.pipeline.data.datasets import BUILTIN_DIGITS, resolve_data
    from clusterssl.pipeline.data.loader import build_loader
    from clusterssl.pipeline.data.spec import MultiCropSpec
    from clusterssl.pipeline.features.extraction import ExtractionSettings, extract_features
    from clusterssl.pipeline.train.checkpoint import load_feature_extractor
    from clusterssl.pipeline.train.world import DistributedEnv, resolve_device

    if threads:
        torch.set_num_threads(threads)
    torch_device = resolve_device(device, DistributedEnv())
    dataset = resolve_data(data, split="train")
    side = size or (32 if data == BUILTIN_DIGITS else 224)
    spec = MultiCropSpec.preset("eval", global_size=side)
    if checkpoint:
        module, _ = load_feature_extractor(checkpoint)
        backbone = f"{checkpoint} (feature extractor)"
    else:
        torch.manual_seed(0)
        module = create_backbone(backbone)
    module = module.to(torch_device).eval()

    def synchronize() -> None:
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)

    _progress(f"pre-loading the batches of {dataset.name} ({dataset.num_samples:,} images, {side} px) …")
    settings = ExtractionSettings(batch_size=batch_size, backend=backend, num_workers=num_workers)
    loader = build_loader(
        dataset.source,
        spec,
        settings.batch_size,
        backend=settings.backend,
        num_workers=settings.num_workers,
        device=torch_device,
    )
    batches = []
    for batch in loader:
        batches.append(batch.views[0].to(torch_device))
        if preload_batches is not None and len(batches) >= preload_batches:
            break
    preloaded_images = sum(int(b.shape[0]) for b in batches)

    summary: dict[str, Any] = {
        "data": dataset.name,
        "num_samples": dataset.num_samples,
        "image_size": side,
        "backbone": backbone,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "backend": loader.backend,
        "device": str(torch_device),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "repeats": repeats,
        "forward_batches": len(batches),
        "load_average_before": os.getloadavg()[0],
    }
    with torch.no_grad():
        for _ in range(2):  # warm-up: allocator, kernels, caches
            module(batches[0])
        synchronize()
        forward_rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for images in batches:
                module(images)
            synchronize()
            forward_rates.append(preloaded_images / (time.perf_counter() - start))

    extraction_rates = []
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        for repeat in range(repeats):
            _progress(f"extraction pass {repeat + 1}/{repeats} …")
            start = time.perf_counter()
            bank = extract_features(
                module,
                dataset.source,
                spec=spec,
                settings=settings,
                device=torch_device,
                out_dir=Path(tmp) / f"bank{repeat}",
                progress=False,
            )
            synchronize()
            extraction_rates.append(bank.meta.num_samples / (time.perf_counter() - start))
    summary["load_average_after"] = os.getloadavg()[0]
    summary["forward_images_per_s"] = max(forward_rates)
    summary["forward_images_per_s_median"] = float(np.median(forward_rates))
    summary["extraction_images_per_s"] = max(extraction_rates)
    summary["extraction_images_per_s_median"] = float(np.median(extraction_rates))
    summary["ratio"] = summary["extraction_images_per_s"] / summary["forward_images_per_s"]
    return summary


def _progress(message: str) -> None:
    """Stage lines on stderr, so that ``--json`` output stays one object on stdout."""
    click.echo(message, err=True)


def _human(summary: Mapping[str, Any]) -> str:
    return "\n".join(
        [
            f"extraction pass on {summary['data']} ({summary['num_samples']:,} images, "
            f"{summary['image_size']} px), {summary['backbone']}, batch {summary['batch_size']}, "
            f"{summary['backend']} loader with {summary['num_workers']} worker(s), {summary['device']}, "
            f"{summary['torch_threads']} torch thread(s); best of {summary['repeats']}",
            f"  bare forward (pre-loaded batches)  {summary['forward_images_per_s']:9.1f} images/s "
            f"(median {summary['forward_images_per_s_median']:.1f})",
            f"  extraction pass (read → bank)      {summary['extraction_images_per_s']:9.1f} images/s "
            f"(median {summary['extraction_images_per_s_median']:.1f})",
            f"  ratio {100 * summary['ratio']:.1f}% (target >= 90%); 1-min load average "
            f"{summary['load_average_before']:.1f} before, {summary['load_average_after']:.1f} after on "
            f"{summary['cpus']} CPUs",
        ]
    )


@click.command("extract")
@click.argument("data", default="digits")
@click.option(
    "--backbone", default="resnet18", show_default=True, help="Backbone (random init) to embed with."
)
@click.option("--checkpoint", help="Use this checkpoint's feature extractor instead of --backbone.")
@click.option("--size", type=click.IntRange(min=8), help="Eval view side (default: 32 for digits, else 224).")
@batch_size_option
@num_workers_option("Loader workers (torch) or DALI threads, as `clusterssl extract`.")
@backend_option
@device_option
@click.option(
    "--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Runs of each; best kept."
)
@click.option(
    "--preload-batches",
    type=click.IntRange(min=1),
    help="Pre-load only the first N batches for the bare forward (default: all; large sets need a limit).",
)
@click.option(
    "--threads", type=click.IntRange(min=1), help="torch intra-op threads (default: torch's choice)."
)
@json_option
def extract_command(as_json: bool, **options: Any) -> None:
    """Images/s of the extraction pass against the bare forward pass of the same backbone over the same
    pre-loaded batches, measured in one run."""
    summary = run_benchmark(**options)
    emit(summary, as_json, _human)


def main(argv: list[str] | None = None) -> None:
    extract_command.main(args=argv, prog_name="python -m clusterssl.tools.bench_extract")


if __name__ == "__main__":
    main()
