"""``clusterssl shards …``: convert, verify and describe shard sets."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import click

from clusterssl.errors import ShardsError
from clusterssl.shards.jpeg import DEFAULT_MAX_PIXELS
from clusterssl.tools.options import emit, json_option

KNOWN_SOURCES = ("digits", "idx", "imagefolder", "list", "parquet")


def default_workers() -> int:
    """The CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


class ByteSize(click.ParamType):
    """``500000``, ``256MB``, ``1.5GiB``… (decimal and binary units)."""

    name = "size"
    _UNITS: ClassVar[dict[str, int]] = {
        "": 1,
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
    }

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else ""
        if not match or unit not in self._UNITS:
            self.fail(f"{value!r} is not a size like 500000, 256MB or 1GiB", param, ctx)
        size = int(float(match.group(1)) * self._UNITS[unit])
        if size <= 0:
            self.fail("a size must be positive", param, ctx)
        return size


class SourceGroup(click.Group):
    """``convert <source kind> …``: an unknown kind is one line naming the known ones (exit 2)."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and not args[0].startswith("-") and self.get_command(ctx, args[0]) is None:
            raise ShardsError(f"unknown source kind {args[0]!r}; known: {', '.join(KNOWN_SOURCES)}")
        return super().resolve_command(ctx, args)


@click.group()
def shards() -> None:
    """Turn image datasets into WebDataset shards (with DALI indexes and a manifest) and check them."""


@shards.group(cls=SourceGroup)
def convert() -> None:
    """Convert a dataset into shards: `convert imagefolder DIR OUT`, `convert list FILE OUT`,
    `convert idx PATH OUT`, `convert parquet PATH… OUT`, `convert digits OUT`.

    Samples are shuffled (seeded) at write time, checked (bad inputs are skipped and listed in
    manifest.json), numbered 0..N-1, and written in parallel, one shard per worker task. An interrupted
    conversion finishes when the same command is run again; a finished one is left as it is.
    """


def convert_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--samples-per-shard",
            type=click.IntRange(min=1),
            help="Inputs per shard (default 1000 when no --bytes-per-shard). Aim for at least as many shards "
            "as data-loading workers × GPUs, and shards of 100 MB–1 GB on large sets.",
        ),
        click.option(
            "--bytes-per-shard",
            type=ByteSize(),
            help="Close a shard before it passes this size (e.g. 256MB); combines with --samples-per-shard.",
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=1),
            default=default_workers,
            show_default="all CPUs",
            help="Parallel writer processes, one shard at a time each.",
        ),
        click.option(
            "--seed", type=int, default=0, show_default=True, help="Seed of the shuffle and the hold-out."
        ),
        click.option(
            "--max-side",
            type=click.IntRange(min=8),
            help="Downscale images whose longer side is larger, re-encoding them (smaller JPEGs are kept "
            "as they are). Saves decode time when training only uses small crops.",
        ),
        click.option(
            "--max-pixels",
            type=click.IntRange(min=0),
            default=DEFAULT_MAX_PIXELS,
            show_default=True,
            help="Skip inputs whose header declares more pixels (width × height): a few hundred bytes can "
            "declare a 60000×60000 image that takes 10 GB to decode. The default is Pillow's limit; raise "
            "it for genuinely huge scans (and add --max-side to store them smaller; the loader skips "
            "stored images above the default). 0: no limit.",
        ),
        click.option(
            "--check",
            type=click.Choice(["cheap", "decode"]),
            default="cheap",
            show_default=True,
            help="cheap: the header parses and a JPEG is not truncated; decode: also decode every kept "
            "JPEG (slower; catches corrupt image data that a header check cannot see).",
        ),
        click.option(
            "--jpeg-quality",
            type=click.IntRange(1, 100),
            default=95,
            show_default=True,
            help="Quality of re-encoded images (non-JPEG inputs, --max-side).",
        ),
        click.option(
            "--holdout",
            type=click.FloatRange(0, 1, min_open=True, max_open=True),
            help="Write this fraction of every class to OUT/val and the rest to OUT/train (stratified, "
            "seeded), each a complete shard set.",
        ),
        click.option("--overwrite", is_flag=True, help="Replace a shard set made with other parameters."),
        json_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


@convert.command("imagefolder")
@click.argument("directory", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@convert_options
def convert_imagefolder(directory: Path, out_dir: Path, **options: Any) -> None:
    """DIRECTORY/<class>/<image> → shards in OUT_DIR (class ids in sorted folder-name order)."""
    from clusterssl.shards.sources import ImageFolderSource

    _convert(ImageFolderSource(directory), out_dir, **options)


@convert.command("list")
@click.argument("list_file", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@convert_options
def convert_list(list_file: Path, out_dir: Path, **options: Any) -> None:
    """A .csv (header `path[,label]`) or .jsonl ({"path": …, "label": …}) list → shards in OUT_DIR.

    Relative paths are resolved against the list's folder; labels are optional: integers are class ids
    0..K-1 (-1: unlabelled; at most 99999 or 10 per entry, give sparse or huge ids as names), names get
    ids in sorted order, and a list mixing the two is refused. An entry naming a file listed before is
    left out (noted in the summary and the manifest).
    """
    from clusterssl.shards.sources import ListSource

    _convert(ListSource(list_file), out_dir, **options)


@convert.command("digits")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--image-size", type=click.IntRange(min=8), default=32, show_default=True, help="Side of the JPEGs."
)
@convert_options
def convert_digits(out_dir: Path, image_size: int, **options: Any) -> None:
    """scikit-learn's 1,797 bundled handwritten digits (8×8, upscaled, RGB JPEG; labels 0..9) → OUT_DIR."""
    from clusterssl.shards.sources import DigitsSource

    _convert(DigitsSource(image_size), out_dir, **options)


# Grey 28-px images are small at any quality; 100 keeps the pixels within a grey level or two.
@convert.command("idx", context_settings={"default_map": {"jpeg_quality": 100}})
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--labels",
    type=click.Path(path_type=Path),
    help="The label file of an explicit image file (default: its '*-labels-idx1-ubyte[.gz]' sibling).",
)
@convert_options
def convert_idx(path: Path, out_dir: Path, labels: Path | None, **options: Any) -> None:
    """MNIST-style IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST) → shards.

    PATH a directory: its train-* and t10k-* (or test-*) pairs become OUT_DIR/train and OUT_DIR/test.
    PATH an '*-images-idx3-ubyte[.gz]' file: it and its label file become one set in OUT_DIR. Images are
    stored as greyscale JPEGs of --jpeg-quality (100 here unless given); labels are the class ids.
    """
    from clusterssl.shards.convert import merge_outcomes
    from clusterssl.shards.idx import IdxSource, convert_idx_directory, labels_for

    quality = options["jpeg_quality"]
    if path.is_dir():
        if labels is not None:
            raise ShardsError("--labels goes with an image file, not with a directory")
        if options["holdout"] is not None:
            raise ShardsError("--holdout splits one set; a directory of IDX pairs is already split")
        as_json = options.pop("as_json")
        outcomes = convert_idx_directory(
            path, out_dir, _convert_options(**options), jpeg_quality=quality, progress=True
        )
        emit(conversion_summary(merge_outcomes(list(outcomes.values()))), as_json, render_conversion)
        return
    if not path.is_file():
        raise ShardsError(f"IDX source does not exist: {path}")
    _convert(IdxSource(path, labels or labels_for(path), quality), out_dir, **options)


@convert.command("parquet")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--image-column",
    default="image",
    show_default=True,
    help="The image column: binary, or a struct with a 'bytes' field (Hugging Face's Image feature).",
)
@click.option("--label-column", default="label", show_default=True, help="The integer class-id column.")
@convert_options
def convert_parquet(
    paths: tuple[Path, ...], out_dir: Path, image_column: str, label_column: str, **options: Any
) -> None:
    """Parquet files (or folders of them) in Hugging Face's layout → shards in OUT_DIR.

    Class names come from the files' 'huggingface' metadata when they carry a ClassLabel, else the ids.
    Files are read a row group at a time, so memory stays bounded whatever their size; rows without
    image bytes or with a label out of range are skipped and listed in manifest.json.
    """
    from clusterssl.shards.parquet import ParquetSource

    _convert(ParquetSource(paths, image_column, label_column), out_dir, **options)


def _convert(source: Any, out_dir: Path, as_json: bool, **options: Any) -> None:
    emit(conversion_summary(_run_conversion(source, out_dir, **options)), as_json, render_conversion)


def _run_conversion(source: Any, out_dir: Path, **options: Any) -> Any:
    from clusterssl.shards.convert import convert

    return convert(source, out_dir, _convert_options(**options), progress=True)


def _convert_options(**options: Any) -> Any:
    """The command line's conversion options as ``ConvertOptions``."""
    from clusterssl.shards.convert import ConvertOptions
    from clusterssl.shards.images import PrepareOptions

    return ConvertOptions(
        samples_per_shard=options["samples_per_shard"],
        bytes_per_shard=options["bytes_per_shard"],
        seed=options["seed"],
        holdout=options["holdout"],
        prepare=PrepareOptions(
            options["check"],
            options["max_side"],
            options["jpeg_quality"],
            options["max_pixels"] or None,
        ),
        workers=options["workers"],
        overwrite=options["overwrite"],
    )


def conversion_summary(outcome: Any) -> dict[str, Any]:
    """The JSON summary of a conversion (``shards.convert.ConvertOutcome``)."""
    sets = []
    for result in outcome.sets:
        manifest = result.manifest
        sets.append(
            {
                "name": result.name or None,
                "directory": str(result.directory),
                "status": result.status,
                "count": manifest.count,
                "classes": len(manifest.classes),
                "shards": len(manifest.shards),
                "bytes": sum(s.bytes for s in manifest.shards),
                "skipped": [{"input": s.input, "reason": s.reason} for s in manifest.skipped],
                "notes": manifest.notes,
                "shards_written": result.shards_written,
                "shards_renumbered": result.shards_renumbered,
            }
        )
    seconds = outcome.seconds
    processed = outcome.inputs_processed
    return {
        "inputs": outcome.inputs,
        "inputs_processed": processed,
        "seconds": round(seconds, 3),
        "images_per_s": round(processed / seconds, 1) if processed and seconds > 0 else None,
        "unchanged": outcome.unchanged,
        "sets": sets,
    }


def printable(text: str) -> str:
    """``text`` with every control or unprintable character escaped (``\\n``, ``\\x1b``, ``\\udcff``): an
    input's name is the user's data, and a newline in it must not fake a line of the summary."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in text
    )


def render_conversion(summary: Mapping[str, Any]) -> str:
    lines = []
    for s in summary["sets"]:
        what = f"{s['count']} samples in {s['shards']} shard(s), {s['bytes'] / 1e6:.1f} MB"
        if s["status"] == "unchanged":
            lines.append(f"{s['directory']}: already converted with these parameters ({what}); nothing to do")
            continue
        note = f", {s['shards_written']} shard(s) written by this run" if s["status"] == "resumed" else ""
        lines.append(f"{s['directory']}: {what}, {len(s['skipped'])} input(s) skipped [{s['status']}{note}]")
        lines.extend(f"    note: {printable(text)}" for text in s["notes"])
        for skipped in s["skipped"][:5]:
            lines.append(f"    skipped {printable(skipped['input'])}: {printable(skipped['reason'])}")
        if len(s["skipped"]) > 5:
            lines.append(f"    … {len(s['skipped']) - 5} more in {s['directory']}/manifest.json")
    if summary["images_per_s"] is not None:
        lines.append(
            f"{summary['inputs_processed']} of {summary['inputs']} inputs processed in {summary['seconds']:.1f} s "
            f"({summary['images_per_s']:.0f} images/s)"
        )
    return "\n".join(lines)


@shards.command("verify")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=default_workers,
    show_default="all CPUs",
    help="Shards checked in parallel.",
)
@click.option("--no-decode", is_flag=True, help="Skip decoding the images (every other check still runs).")
@json_option
def verify_command(directory: Path, workers: int, no_decode: bool, as_json: bool) -> None:
    """Check a shard set (or OUT with train/ and val/) against its manifest; exit 1 naming what is bad.

    Sizes and sha256, tar headers, DALI indexes against their tars, complete samples with consistent
    labels, every global index 0..N-1 exactly once, and every image decodes.
    """
    reports = verify_sets(directory, workers=workers, decode=not no_decode)
    summary = {"ok": all(r.ok for r in reports), "sets": [r.to_json() for r in reports]}
    emit(summary, as_json, lambda _: "\n".join(r.render() for r in reports))
    if not summary["ok"]:
        raise SystemExit(1)


def verify_sets(directory: Path, workers: int, decode: bool = True) -> list[Any]:
    """``VerifyReport`` of every shard set at ``directory`` (itself, or its train/ and val/)."""
    from clusterssl.shards.manifest import find_shard_sets
    from clusterssl.shards.verify import verify

    return [
        verify(path, workers=workers, decode=decode, progress=True) for path in find_shard_sets(directory)
    ]


@shards.command("info")
@click.argument("directory", type=click.Path(path_type=Path))
@json_option
def info_command(directory: Path, as_json: bool) -> None:
    """Counts, classes (with per-class counts), shard count and sizes of a shard set, from its manifest."""
    from clusterssl.shards.manifest import find_shard_sets
    from clusterssl.shards.verify import describe

    sets = [describe(path) for path in find_shard_sets(directory)]
    emit({"sets": sets}, as_json, lambda summary: "\n\n".join(render_info(s) for s in summary["sets"]))


def _large_images_line(large: Mapping[str, Any] | None) -> list[str]:
    if not large or not large["count"]:
        return []
    return [
        f"  large     {large['count']} image(s) above {large['side_above']} px on a side (up to "
        f"{large['largest_side']} px): decoding them costs far more than a crop needs; consider "
        "converting with --max-side"
    ]


def render_info(info: Mapping[str, Any]) -> str:
    source = info["source"]
    lines = [
        f"{info['directory']}" + (f"  ({info['subset']})" if info["subset"] else ""),
        f"  samples   {info['count']}"
        + (f" ({info['unlabelled']} unlabelled)" if info["unlabelled"] else ""),
        f"  shards    {info['shards']}, {info['bytes'] / 1e6:.1f} MB "
        f"({info['shard_samples']['min']}–{info['shard_samples']['max']} samples, "
        f"{info['shard_bytes']['min'] / 1e6:.1f}–{info['shard_bytes']['max'] / 1e6:.1f} MB each)",
        f"  skipped   {info['skipped']} input(s) (listed in manifest.json)",
        *(f"  note      {note}" for note in info["notes"]),
        *_large_images_line(info["large_images"]),
        f"  source    {source.get('kind', '?')} {source.get('path', '')}".rstrip() + f", seed {info['seed']}",
        f"  hash      {info['content_hash']}",
    ]
    classes = info["classes"]
    if info["class_counts"] is not None:
        shown = ", ".join(f"{name}: {n}" for name, n in list(info["class_counts"].items())[:20])
        more = f", … ({len(classes)} in all)" if len(classes) > 20 else ""
        lines.append(f"  classes   {len(classes)}: {shown}{more}")
    elif classes:
        lines.append(f"  classes   {len(classes)} (per-class counts not recorded in this manifest)")
    else:
        lines.append("  classes   none (unlabelled)")
    return "\n".join(lines)
