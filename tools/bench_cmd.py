"""``clusterssl bench …``: benchmarks that print a figure next to a baseline measured in the same run."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from clusterssl.tools.options import crop_size_options, emit, json_option


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
    from clusterssl.tools.bench_convert import render, run_benchmark

    summary = run_benchmark(
        sorted(set(sizes)), workers, repeats, directory, keep=keep, samples_per_shard=samples_per_shard
    )
    emit(summary, as_json, lambda s: render(dict(s)))


@bench.command("loader")
@click.argument("data", type=str, required=False)
@click.option(
    "--generate",
    type=click.IntRange(min=1),
    help="Instead of DATA: generate this many ImageNet-sized JPEGs (the `bench convert` images) and "
    "convert them to shards first.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --generate: where to put the images and shards (default: the system temp dir; removed after).",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "torch", "dali"]),
    default="auto",
    show_default=True,
    help="Loader backend to measure (auto: DALI on a GPU, torch otherwise).",
)
@click.option(
    "--preset",
    type=click.Choice(["swav", "dino", "eval"]),
    default="swav",
    show_default=True,
    help="Views to make.",
)
@crop_size_options
@click.option(
    "--num-local", type=click.IntRange(min=0), help="Local crops (default: the preset's, 6 for swav)."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--num-workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="DataLoader workers (torch) or DALI threads; match the machine's cores.",
)
@click.option("--batches", type=click.IntRange(min=1), default=20, show_default=True, help="Batches timed.")
@click.option(
    "--warmup", type=click.IntRange(min=1), default=3, show_default=True, help="Batches before timing."
)
@click.option(
    "--device", default="auto", show_default=True, help="Where views are delivered: auto, cpu, cuda."
)
@click.option(
    "--pixel-ops",
    type=click.Choice(["auto", "worker", "device"]),
    default="auto",
    show_default=True,
    help="torch backend: colour/blur/normalise in the workers (auto on CPU) or batched on the device.",
)
@click.option(
    "--grid", type=click.Path(dir_okay=False, path_type=Path), help="Save a PNG of one batch's views here."
)
@json_option
def loader_benchmark(
    data: str | None,
    generate: int | None,
    directory: Path | None,
    backend: str,
    preset: str,
    global_size: int,
    local_size: int,
    num_local: int | None,
    batch_size: int,
    num_workers: int,
    batches: int,
    warmup: int,
    device: str,
    pixel_ops: str,
    grid: Path | None,
    as_json: bool,
) -> None:
    """Images/s of the multi-crop loader on DATA (a shard directory) after warm-up, beside the
    decode-only ceiling (bytes → RGB with the same workers) measured in the same run.

    Without DATA, `--generate N` makes N ImageNet-sized JPEGs (~450×370, ~50 KB) and converts them.
    """
    import torch

    from clusterssl.pipeline.data.loader import default_device
    from clusterssl.pipeline.data.spec import MultiCropSpec
    from clusterssl.tools.bench_loader import generated_shards, render, run_benchmark

    if (data is None) == (generate is None):
        raise click.UsageError("give either DATA or --generate N")
    spec = MultiCropSpec.preset(preset, global_size=global_size, local_size=local_size, num_local=num_local)
    with generated_shards(generate, directory) if generate else contextlib.nullcontext(data) as shards:
        summary = run_benchmark(
            shards,
            backend=backend,
            spec=spec,
            batch_size=batch_size,
            num_workers=num_workers,
            batches=batches,
            warmup=warmup,
            device=default_device() if device == "auto" else torch.device(device),
            pixel_ops=pixel_ops,
            grid=grid,
            progress=not as_json,
        )
    emit(summary, as_json, lambda s: render(dict(s)))


def _register_kmeans() -> None:
    """`bench kmeans` is defined beside its benchmark code (tools/bench_kmeans.py)."""
    from clusterssl.tools.bench_kmeans import kmeans_command

    bench.add_command(kmeans_command, "kmeans")


def _register_seeding() -> None:
    """`bench seeding` is defined beside its benchmark code (tools/bench_seeding.py)."""
    from clusterssl.tools.bench_seeding import seeding_command

    bench.add_command(seeding_command, "seeding")


def _register_gpu() -> None:
    """`bench gpu` is defined beside its benchmark code (tools/bench_gpu.py)."""
    from clusterssl.tools.bench_gpu import gpu_command

    bench.add_command(gpu_command, "gpu")


def _register_extract() -> None:
    """`bench extract` is defined beside its benchmark code (tools/bench_extract.py)."""
    from clusterssl.tools.bench_extract import extract_command

    bench.add_command(extract_command, "extract")


def _register_linear() -> None:
    """`bench linear` is defined beside its benchmark code (tools/bench_linear.py)."""
    from clusterssl.tools.bench_linear import main

    bench.add_command(main, "linear")


def _register_layout() -> None:
    """`bench layout` is defined beside its measurement code (tools/bench_layout.py)."""
    from clusterssl.tools.bench_layout import main

    bench.add_command(main, "layout")


_register_kmeans()
_register_seeding()
_register_gpu()
_register_extract()
_register_linear()
_register_layout()


@bench.command("train")
@click.option(
    "--method",
    "methods",
    multiple=True,
    help="Method to time (repeat the option); default: every registered method the backbone suits.",
)
@click.option("--backbone", default="resnet50", show_default=True, help="Backbone name.")
@click.option(
    "--backbone-option",
    "backbone_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Backbone constructor option (repeatable), e.g. depth=6 for a ViT.",
)
@click.option(
    "--preset", type=click.Choice(["swav", "dino"]), default="swav", show_default=True, help="Multi-crop."
)
@crop_size_options
@click.option(
    "--num-local", type=click.IntRange(min=0), help="Local crops (default: the preset's, 6 swav / 8 dino)."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Per step.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="Timed steps.")
@click.option(
    "--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed steps first."
)
@click.option("--device", default="auto", show_default=True, help="auto (GPU when available), cpu, cuda.")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="auto: bf16 on GPU, fp32 on CPU (as the trainer).",
)
@click.option(
    "--optimizer",
    type=click.Choice(["sgd", "lars", "adamw"]),
    default="sgd",
    show_default=True,
    help="The same optimizer for the bare backbone and every method.",
)
@click.option(
    "--set",
    "method_overrides",
    multiple=True,
    metavar="METHOD.KEY=VALUE",
    help="Method setting (repeatable), e.g. --set swav.num_prototypes=100; default: the papers' settings.",
)
@click.option(
    "--bank-samples",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Synthetic images for methods that cluster a feature store at epoch start (untimed).",
)
@click.option("--threads", type=click.IntRange(min=1), help="torch intra-op threads (default: torch's).")
@click.option("--seed", type=int, default=0, show_default=True)
@json_option
def train_benchmark(
    methods: tuple[str, ...],
    backbone: str,
    backbone_options: tuple[str, ...],
    preset: str,
    global_size: int,
    local_size: int,
    num_local: int | None,
    batch_size: int,
    steps: int,
    warmup: int,
    device: str,
    precision: str,
    optimizer: str,
    method_overrides: tuple[str, ...],
    bank_samples: int,
    threads: int | None,
    seed: int,
    as_json: bool,
) -> None:
    """Training images/s of each method on synthetic multi-crop tensors, beside the bare forward+backward
    of the same backbone on the same tensors (measured before and after), so each method's overhead shows.
    """
    import torch

    from clusterssl.config import apply_overrides
    from clusterssl.pipeline.data.spec import MultiCropSpec
    from clusterssl.pipeline.train.world import DistributedEnv, resolve_device
    from clusterssl.tools.bench_train import render, run_benchmark

    if threads:
        torch.set_num_threads(threads)
    spec = MultiCropSpec.preset(preset, global_size=global_size, local_size=local_size, num_local=num_local)
    summary = run_benchmark(
        methods=list(methods),
        backbone=backbone,
        backbone_kwargs=apply_overrides({}, backbone_options),
        spec=spec,
        batch_size=batch_size,
        steps=steps,
        warmup=warmup,
        device=resolve_device(device, DistributedEnv()),
        precision=precision,
        optimizer=optimizer,
        method_overrides=method_overrides,
        bank_samples=bank_samples,
        seed=seed,
        progress=not as_json,
    )
    emit(summary, as_json, render)
