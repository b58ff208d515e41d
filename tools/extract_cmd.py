"""``clusterssl extract CHECKPOINT DATA --out BANK_DIR``: the index-stable extraction pass into a feature store."""

from __future__ import annotations

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


@click.command()
@click.argument("checkpoint")
@click.argument("data")
@click.option("--out", "out_dir", required=True, help="Bank directory (features.npy, labels.npy, bank.json).")
@click.option(
    "--split",
    type=click.Choice(["train", "val"]),
    default="train",
    show_default=True,
    help="With DATA = digits: which split of the built-in digits.",
)
@click.option(
    "--manifest", help="manifest.json of DATA when it is URLs with none next to them (pipe:, http)."
)
@backend_option
@batch_size_option
@num_workers_option("Loader workers (torch) or DALI threads; match the cores the model leaves free.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Storage of the features; float16 halves the bank (ImageNet × 2048: 5 GB instead of 10).",
)
@device_option
@json_option
def extract(
    checkpoint: str,
    data: str,
    out_dir: str,
    split: str,
    manifest: str | None,
    backend: str,
    batch_size: int,
    num_workers: int,
    dtype: str,
    device: str,
    as_json: bool,
) -> None:
    """Embed every sample of DATA once with CHECKPOINT's feature extractor (the eval view of its run
    config) into BANK_DIR/features.npy, row i for global index i (numpy.load(…, mmap_mode="r") reads it).

    CHECKPOINT is a checkpoint.pt, a backbone.pt or a run directory; DATA a shard directory, its
    manifest, shard URLs, or `digits`. After an interruption, run the same command again: it continues
    the bank. Under torchrun every rank embeds its share and rank 0 writes the bank.
    """
    import time

    from clusterssl.pipeline.features.extraction import ExtractionSettings, extract_checkpoint
    from clusterssl.pipeline.train.world import DistributedEnv

    start = time.perf_counter()
    bank = extract_checkpoint(
        checkpoint,
        data,
        out_dir,
        split=split,
        settings=ExtractionSettings(batch_size=batch_size, backend=backend, num_workers=num_workers),
        dtype=dtype,
        device=device,
        progress=not as_json,
        manifest=manifest,
    )
    seconds = time.perf_counter() - start
    if not DistributedEnv.from_environment().is_main:
        return
    embedded = bank.meta.num_samples - bank.rows_resumed
    summary = {
        "bank": out_dir,
        "features": str(Path(out_dir) / "features.npy"),
        "num_samples": bank.meta.num_samples,
        "dim": bank.meta.dim,
        "dtype": bank.meta.dtype,
        "resumed_rows": bank.rows_resumed,
        "seconds": round(seconds, 3),
        "images_per_s": round(embedded / seconds, 1) if seconds > 0 else 0.0,
        "checkpoint": bank.meta.source["checkpoint"],
        "manifest_hash": bank.meta.source["manifest_hash"],
    }
    emit(summary, as_json, _render)


def _render(summary: Mapping[str, Any]) -> str:
    resumed = f", {summary['resumed_rows']} rows resumed" if summary["resumed_rows"] else ""
    return (
        f"extracted {summary['num_samples']} × {summary['dim']} {summary['dtype']} features into "
        f"{summary['features']} in {summary['seconds']:.1f} s ({summary['images_per_s']:.0f} images/s{resumed})"
    )
