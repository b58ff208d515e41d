"""``clusterssl bench loader``: multi-crop throughput of a backend, and the decode-only ceiling beside it.

1. The loader as training uses it (``build_loader``, views delivered on the device), images/s over
   ``batches`` batches after ``warmup`` batches (epochs are chained when one is too short).
2. In the same run, with the same workers and the same shards: reading + JPEG decoding only (bytes →
   RGB pixels, no augmentation), with the backend's own decoder — the ceiling any augmentation pipeline
   on this machine stays under. ``decode_share`` = loader images/s ÷ decode-only images/s: the fraction
   of the loader's time that decoding alone would take.
3. A PNG grid of one batch's views (rows: samples; columns: views), so a person can see the augmentation.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterssl.pipeline.data.loader import build_loader
from clusterssl.pipeline.data.shardset import ShardSet, open_reader, resolve_shards
from clusterssl.pipeline.data.spec import MultiCropSpec


def _chained_batches(make_loader: Any, epochs: int = 1000) -> Iterator[Any]:
    for epoch in range(epochs):
        yield from make_loader(epoch)


@dataclass
class Timing:
    images_per_s: float
    """Wall clock, over the batches after the warm-up."""
    images: int
    cpu_ms_per_image: float
    """CPU time of this process and its (finished) worker processes per image, warm-up included: less
    sensitive than wall time to other programs sharing the machine."""
    first: Any


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(batches: Iterator[Any], count: int, warmup: int, progress: bool, label: str) -> Timing:
    """Time ``count`` batches after ``warmup`` ones; the iterator is closed (workers joined) after."""
    from tqdm import tqdm

    if warmup < 1:
        raise ValueError("warmup must be at least 1 batch (the clock starts after it)")
    cpu_start, seen = _cpu_seconds(), 0
    first, images, start = None, 0, 0.0
    bar = tqdm(total=warmup + count, desc=label, unit="batch", disable=not progress, leave=False)
    for number, batch in enumerate(batches):
        size = _size(batch)
        seen += size
        if first is None:
            first = batch
        bar.update()
        if number + 1 == warmup:
            start = time.perf_counter()
        elif number + 1 > warmup:
            images += size
        if number + 1 == warmup + count:
            break
    elapsed = time.perf_counter() - start
    bar.close()
    close = getattr(batches, "close", None)
    if close is not None:
        close()  # generator → DataLoader iterator → workers exit, and their CPU time is counted
    gc.collect()
    cpu = _cpu_seconds() - cpu_start
    return Timing(images / elapsed, images, 1e3 * cpu / max(1, seen), first)


def _size(batch: Any) -> int:
    return int(batch.index.shape[0]) if hasattr(batch, "index") else int(batch)


# --- decode-only ceiling ---------------------------------------------------------------------------------


class _DecodeOnly(torch.utils.data.Dataset):
    """Item j: read and decode the j-th run of ``batch_size`` samples (shards in order); returns the count."""

    def __init__(self, shardset: ShardSet, batch_size: int) -> None:
        self.shardset, self.batch_size = shardset, batch_size
        self.slots = [(s, p) for s, shard in enumerate(shardset.shards) for p in range(shard.count)]
        self._readers: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.slots) // self.batch_size

    def __getitem__(self, batch: int) -> int:
        from clusterssl.pipeline.data.torch_backend import decode_jpeg

        for shard, position in self.slots[batch * self.batch_size : (batch + 1) * self.batch_size]:
            if shard not in self._readers:
                self._readers[shard] = open_reader(self.shardset.shards[shard])
            decode_jpeg(self._readers[shard].read(position)["jpg"])
        return self.batch_size


def _torch_decode_batches(shardset: ShardSet, batch_size: int, num_workers: int) -> Iterator[int]:
    dataset = _DecodeOnly(shardset, batch_size)
    if len(dataset) == 0:
        raise ValueError("the shard set holds fewer samples than one batch")
    while True:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
            prefetch_factor=4 if num_workers else None,
        )
        yield from loader


def _dali_decode_batches(
    shardset: ShardSet, batch_size: int, num_threads: int, device: torch.device
) -> Iterator[int]:
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"

    @pipeline_def(
        batch_size=batch_size, num_threads=max(1, num_threads), device_id=(device.index or 0) if gpu else None
    )
    def decode_only() -> Any:
        jpeg = fn.readers.webdataset(
            paths=[str(s.local_path) for s in shardset.shards],
            index_paths=[str(s.index_path) for s in shardset.shards],
            ext=["jpg"],
        )
        return fn.decoders.image(jpeg, device="mixed" if gpu else "cpu", output_type=types.RGB)

    pipe = decode_only()
    pipe.build()
    while True:
        pipe.run()
        yield batch_size


# --- grid ------------------------------------------------------------------------------------------------


def save_grid(batch: Any, spec: MultiCropSpec, path: Path, samples: int = 8) -> Path:
    """Rows: the first ``samples`` samples; columns: their views, each at its own size."""
    from PIL import Image

    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    rows, gap, height = min(samples, int(batch.index.shape[0])), 4, max(spec.sizes)
    lefts = np.cumsum([gap] + [size + gap for size in spec.sizes])
    grid = Image.new("RGB", (int(lefts[-1]), rows * (height + gap) + gap), (255, 255, 255))
    for r in range(rows):
        for c, view in enumerate(batch.views):
            pixels = ((view[r].detach().float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
            grid.paste(
                Image.fromarray(pixels.permute(1, 2, 0).numpy()), (int(lefts[c]), gap + r * (height + gap))
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# --- data ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def generated_shards(count: int, directory: Path | None = None) -> Iterator[Path]:
    """ImageNet-sized JPEGs made by ``bench convert``'s generator, converted to shards; removed after."""
    from clusterssl.shards.convert import ConvertOptions, convert
    from clusterssl.shards.sources import ImageFolderSource
    from clusterssl.tools.bench_convert import generate_imagefolder

    workers = os.cpu_count() or 1
    base = Path(tempfile.mkdtemp(prefix="bench-loader-", dir=directory))
    try:
        generate_imagefolder(base / "images", count, workers)
        convert(
            ImageFolderSource(base / "images"),
            base / "shards",
            ConvertOptions(workers=workers),
            progress=True,
        )
        yield base / "shards"
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the benchmark ---------------------------------------------------------------------------------------


def run_benchmark(
    data: str | Path,
    *,
    backend: str,
    spec: MultiCropSpec,
    batch_size: int,
    num_workers: int,
    batches: int,
    warmup: int,
    device: torch.device,
    pixel_ops: str = "auto",
    grid: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    shardset = resolve_shards(data)
    probe = build_loader(shardset, spec, batch_size, backend=backend, num_workers=num_workers, device=device)
    chosen = probe.backend

    def make_loader(epoch: int) -> Any:
        return build_loader(
            shardset,
            spec,
            batch_size,
            backend=chosen,
            num_workers=num_workers,
            device=device,
            epoch=epoch,
            pixel_ops=pixel_ops,
        )

    loader = _timed(_chained_batches(make_loader), batches, warmup, progress, f"{chosen} loader")
    if chosen == "dali":
        decode_batches = _dali_decode_batches(shardset, batch_size, num_workers, device)
    else:
        decode_batches = _torch_decode_batches(shardset, batch_size, num_workers)
    decode = _timed(decode_batches, batches, warmup, progress, "decode only")
    summary: dict[str, Any] = {
        "backend": chosen,
        "preset": spec.name,
        "views": spec.describe(),
        "device": str(device),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "batches": batches,
        "images": loader.images,
        "images_per_s": round(loader.images_per_s, 1),
        "decode_only_images_per_s": round(decode.images_per_s, 1),
        "decode_share": round(loader.images_per_s / decode.images_per_s, 3),
        "cpu_ms_per_image": round(loader.cpu_ms_per_image, 2),
        "decode_only_cpu_ms_per_image": round(decode.cpu_ms_per_image, 2),
        "load_average": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "samples_in_data": shardset.total,
        "mean_jpeg_bytes": _mean_jpeg_bytes(shardset),
    }
    if grid is not None:
        summary["grid"] = str(save_grid(loader.first, spec, grid))
    return summary


def _mean_jpeg_bytes(shardset: ShardSet, samples: int = 200) -> int:
    reader = open_reader(shardset.shards[0])
    sizes = [len(reader.read(p)["jpg"]) for p in range(min(samples, shardset.shards[0].count))]
    return int(np.mean(sizes))


def render(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['backend']} loader, {summary['views']}, batch {summary['batch_size']}, "
        f"{summary['num_workers']} workers, device {summary['device']}:",
        f"  multi-crop loader   {summary['images_per_s']:>8.1f} images/s  ({summary['images']} images after warm-up)",
        f"  decode only         {summary['decode_only_images_per_s']:>8.1f} images/s  (bytes → RGB, same workers)",
        f"  decode share        {100 * summary['decode_share']:>7.1f} %  of the loader's time would be decoding",
        f"  CPU per image       {summary['cpu_ms_per_image']:>8.2f} ms (decode only {summary['decode_only_cpu_ms_per_image']:.2f} ms), "
        f"load average {summary['load_average']}",
    ]
    if "grid" in summary:
        lines.append(f"  views of one batch: {summary['grid']}")
    return "\n".join(lines)
