"""``clusterssl bench …``: benchmarks that print a figure next to a baseline measured in the same run."""

from __future__ import annotations

from pathlib import Path

import click

from tools.cli import emit, json_option


@click.group()
def bench() -> None:
    """Measure throughput against a baseline run on the same machine, in the same run."""


@bench.command("convert")
@click.option(
    "--images",
    "sizes",
    type=click.IntRange(min=10),
    multiple=True,
    default=(2000, 8000),
    show_default=True,
    help="Dataset sizes to measure (repeat the option); the largest is generated, the others link into it.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Converter workers."
)
@click.option(
    "--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Runs per contender."
)
@click.option(
    "--samples-per-shard", type=click.IntRange(min=1), help="Passed to the conversion (default 1000)."
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to put the generated data (default: the system temp dir). Needs about 0.15 MB per image.",
)
@click.option("--keep", is_flag=True, help="Keep the generated data and print where it is.")
@json_option
def convert_benchmark(
    sizes: tuple[int, ...],
    workers: int,
    repeats: int,
    samples_per_shard: int | None,
    directory: Path | None,
    keep: bool,
    as_json: bool,
) -> None:
    """Convert generated ImageNet-sized JPEGs and compare with plain `tar` over the same files.

    Prints images/s and MB/s (input bytes) of `tar cf`, of `tar cf` + fsync, and of the conversion with
    WORKERS processes, their ratio, and the converter's peak resident memory (this process plus its
    workers, sampled every 10 ms) for each size.
    """
    from tools.bench_convert import render, run_benchmark

    summary = run_benchmark(
        sorted(set(sizes)), workers, repeats, directory, keep=keep, samples_per_shard=samples_per_shard
    )
    emit(summary, as_json, lambda s: render(dict(s)))
