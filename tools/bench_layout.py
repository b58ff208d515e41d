"""Measurement: what a leaner sample layout would save on small images, and what it costs the readers.

Takes the first ``--samples`` samples of a shard set and writes them again in three layouts:

- ``current``: jpg, cls, label.i64, index.i64, src (five members, a 512-byte header each, payloads padded
  to 512 bytes);
- ``typed-pair``: jpg, cls, and one ``meta.i64`` member holding label and index (src in the manifest);
- ``image-only``: jpg and cls (label and index only in the manifest / DALI index).

For each it prints the bytes per sample and the seconds DALI's webdataset reader (CPU, decoding the
images) and webdataset's stock ``.decode("rgb8")`` take to read them all.

    python -m clusterssl.tools.bench_layout SHARD_SET [--samples 5000] [--json]
    clusterssl bench layout SHARD_SET [--samples 5000] [--json]
"""

from __future__ import annotations

import struct
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from clusterssl.shards.format import CLASS_EXT, IMAGE_EXT, dali_index_path
from clusterssl.shards.manifest import find_shard_sets, load_manifest
from clusterssl.shards.reader import iter_samples
from clusterssl.shards.tario import ShardTarWriter
from clusterssl.tools.options import emit, json_option

LAYOUTS = ("current", "typed-pair", "image-only")


def _components(layout: str, sample: Any) -> list[tuple[str, bytes]]:
    from clusterssl.shards.format import encode_sample

    if layout == "current":
        return encode_sample(sample.jpeg, sample.label, sample.index, sample.src)
    head = [(IMAGE_EXT, sample.jpeg), (CLASS_EXT, str(sample.label).encode())]
    if layout == "typed-pair":
        return [*head, ("meta.i64", struct.pack("<qq", sample.label, sample.index))]
    return head


def _write(layout: str, samples: list[Any], directory: Path) -> Path:
    tar = directory / f"{layout}.tar"
    with ShardTarWriter(tar) as writer:
        for sample in samples:
            writer.add_sample(sample.key, _components(layout, sample))
        writer.write_dali_index(dali_index_path(tar))
    return tar


def _read_dali(layout: str, tar: Path, count: int) -> float:
    from nvidia.dali import fn, pipeline_def, types

    exts = {"current": ["jpg", "label.i64"], "typed-pair": ["jpg", "meta.i64"], "image-only": ["jpg", "cls"]}[
        layout
    ]
    dtypes = [types.UINT8, types.UINT8 if layout == "image-only" else types.INT64]
    batch = 256

    @pipeline_def(batch_size=batch, num_threads=2, device_id=None, prefetch_queue_depth=1)
    def read() -> Any:
        jpeg, meta = fn.readers.webdataset(
            paths=[str(tar)], index_paths=[str(dali_index_path(tar))], ext=exts, dtypes=dtypes, name="r"
        )
        return fn.decoders.image(jpeg, device="cpu", output_type=types.RGB), meta

    pipe = read()
    pipe.build()
    started = time.perf_counter()
    for _ in range(-(-count // batch)):
        pipe.run()
    return time.perf_counter() - started


def _read_webdataset(tar: Path) -> float:
    import webdataset as wds

    started = time.perf_counter()
    for _ in wds.WebDataset([str(tar)], shardshuffle=False).decode("rgb8"):
        pass
    return time.perf_counter() - started


def run_measurement(location: Path, samples: int) -> dict[str, Any]:
    directory = find_shard_sets(location)[0]
    manifest = load_manifest(directory)
    taken = []
    for sample in iter_samples(directory):
        taken.append(sample)
        if len(taken) == samples:
            break
    mean_image = sum(len(s.jpeg) for s in taken) / len(taken)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for layout in LAYOUTS:
            tar = _write(layout, taken, Path(scratch))
            rows.append(
                {
                    "layout": layout,
                    "bytes_per_sample": round(tar.stat().st_size / len(taken)),
                    "dali_s": round(_read_dali(layout, tar, len(taken)), 2),
                    "webdataset_s": round(_read_webdataset(tar), 2),
                }
            )
    return {"set": str(directory), "format_version": manifest.format_version, "samples": len(taken),
            "mean_image_bytes": round(mean_image), "layouts": rows}  # fmt: skip


def render(summary: Mapping[str, Any]) -> str:
    lines = [
        f"{summary['samples']} samples of {summary['set']} (images {summary['mean_image_bytes']} B on average)"
    ]
    base = summary["layouts"][0]["bytes_per_sample"]
    for row in summary["layouts"]:
        lines.append(
            f"  {row['layout']:<11} {row['bytes_per_sample']:>6} B/sample ({row['bytes_per_sample'] / base:.0%})"
            f"   DALI {row['dali_s']:.2f} s   webdataset {row['webdataset_s']:.2f} s"
        )
    return "\n".join(lines)


@click.command()
@click.argument("location", type=click.Path(exists=True, path_type=Path))
@click.option("--samples", type=click.IntRange(min=1), default=5000, show_default=True)
@json_option
def main(location: Path, samples: int, as_json: bool) -> None:
    """Bytes per sample and read seconds of three sample layouts, on the first SAMPLES of LOCATION."""
    emit(run_measurement(location, samples), as_json, render)


if __name__ == "__main__":
    main()
