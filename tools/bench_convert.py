"""Benchmark of ``shards convert`` against plain ``tar`` over the same files, in the same run.

1. Generate an ImageFolder of ImageNet-sized photo-like JPEGs (smooth colour gradients plus sensor-like
   noise, 400–500 × 330–410 pixels, about 50 KB at quality 90), 10 classes, in parallel, seeded.
2. Read every file once so both contenders start from a warm page cache.
3. Time ``tar cf`` over the tree, then the fsync of its output (reported separately: the converter fsyncs
   each shard before renaming it, so ``tar + fsync`` is the like-for-like baseline).
4. Time ``convert()`` (in this process, so interpreter start-up is not counted; the worker pool's
   start-up is) while a thread samples the RSS of this process and all its children every 10 ms.
Each contender runs ``repeats`` times; the fastest run counts. Outputs are deleted between runs.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shards.convert import ConvertOptions, convert
from shards.parallel import TaskRunner
from shards.sources import ImageFolderSource

CLASSES = 10
JPEG_QUALITY = 90
NOISE_SIGMA = 7.0
"""Chosen so that the JPEGs average about 50 KB, like ImageNet's (~110 KB at ~400×350 is the mean
of the full set; its median file is smaller). Checked and printed by every run."""
_NOISE_TILE = 512


@dataclass(frozen=True)
class _GenerateTask:
    root: str
    start: int
    stop: int
    seed: int


def photo_jpeg(rng: np.random.Generator, noise: np.ndarray) -> bytes:
    """One photo-like JPEG: low- and mid-frequency colour fields plus Gaussian noise (cropped from a tile)."""
    width, height = int(rng.integers(400, 501)), int(rng.integers(330, 411))
    coarse = Image.fromarray(rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    detail = Image.fromarray(rng.integers(0, 256, size=(24, 30, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    y, x = int(rng.integers(0, _NOISE_TILE - height)), int(rng.integers(0, _NOISE_TILE - width))
    pixels = (
        0.75 * np.asarray(coarse, dtype=np.float32)
        + 0.25 * np.asarray(detail, dtype=np.float32)
        + noise[y : y + height, x : x + width]
    )
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=JPEG_QUALITY
    )
    return buffer.getvalue()


def _generate(task: _GenerateTask) -> int:
    rng = np.random.default_rng([task.seed, task.start])
    noise = rng.normal(0.0, NOISE_SIGMA, size=(_NOISE_TILE, _NOISE_TILE, 3)).astype(np.float32)
    root = Path(task.root)
    for i in range(task.start, task.stop):
        path = root / f"class{i % CLASSES:02d}" / f"img{i:06d}.jpg"
        path.write_bytes(photo_jpeg(rng, noise))
    return task.stop - task.start


def generate_imagefolder(root: Path, count: int, workers: int, seed: int = 0) -> None:
    for c in range(CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    chunk = 250
    tasks = [_GenerateTask(str(root), s, min(s + chunk, count), seed) for s in range(0, count, chunk)]
    with TaskRunner(workers) as runner:
        for _ in runner.map_unordered(_generate, tasks):
            pass


def subset_imagefolder(full: Path, root: Path, count: int) -> None:
    """The first ``count`` images of ``full`` as hard links (same files, same page-cache pages)."""
    for c in range(CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name = f"class{i % CLASSES:02d}/img{i:06d}.jpg"
        os.link(full / name, root / name)


def dataset_stats(root: Path) -> dict[str, Any]:
    paths = sorted(root.rglob("*.jpg"))
    sizes = np.array([p.stat().st_size for p in paths])
    sample = [Image.open(p).size for p in paths[:: max(1, len(paths) // 200)]]
    return {
        "images": len(paths),
        "bytes": int(sizes.sum()),
        "mean_kb": round(float(sizes.mean()) / 1e3, 1),
        "min_kb": round(float(sizes.min()) / 1e3, 1),
        "max_kb": round(float(sizes.max()) / 1e3, 1),
        "mean_size": [
            round(float(np.mean([s[0] for s in sample]))),
            round(float(np.mean([s[1] for s in sample]))),
        ],
    }


def warm_page_cache(root: Path) -> None:
    for path in root.rglob("*.jpg"):
        path.read_bytes()


class ProcessTreeRss:
    """Samples the resident memory of this process plus all its descendants (Linux /proc), every
    ``interval`` seconds, keeping the peak of the sum and the peak of any single process."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak_total = 0
        self.peak_process = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _tree(self, pid: int) -> list[int]:
        found, todo = [], [pid]
        while todo:
            current = todo.pop()
            found.append(current)
            for task in Path(f"/proc/{current}/task").glob("*"):
                try:
                    todo.extend(int(c) for c in (task / "children").read_text().split())
                except OSError:
                    continue
        return found

    def _rss(self, pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self._page
        except (OSError, IndexError, ValueError):
            return 0

    def sample(self) -> None:
        sizes = [self._rss(pid) for pid in self._tree(os.getpid())]
        self.peak_total = max(self.peak_total, sum(sizes))
        self.peak_process = max(self.peak_process, max(sizes, default=0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> ProcessTreeRss:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def time_tar(root: Path, out: Path) -> tuple[float, float]:
    """(seconds of ``tar cf``, seconds of the fsync of its output that follows)."""
    started = time.perf_counter()
    subprocess.run(["tar", "cf", str(out), "-C", str(root), "."], check=True)
    tar_done = time.perf_counter()
    fsync_path(out)
    return tar_done - started, time.perf_counter() - tar_done


def time_convert(root: Path, out: Path, workers: int, samples_per_shard: int | None) -> dict[str, Any]:
    with ProcessTreeRss() as rss:
        started = time.perf_counter()
        outcome = convert(
            ImageFolderSource(root), out, ConvertOptions(samples_per_shard=samples_per_shard, workers=workers)
        )
        seconds = time.perf_counter() - started
    manifest = outcome.sets[0].manifest
    assert manifest.count == outcome.inputs and not manifest.skipped, (
        "the benchmark data must convert cleanly"
    )
    return {
        "seconds": seconds,
        "shards": len(manifest.shards),
        "output_bytes": sum(s.bytes for s in manifest.shards),
        "peak_rss_total_mb": round(rss.peak_total / 2**20, 1),
        "peak_rss_process_mb": round(rss.peak_process / 2**20, 1),
    }


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def bench_one(
    root: Path, scratch: Path, workers: int, repeats: int, samples_per_shard: int | None
) -> dict[str, Any]:
    stats = dataset_stats(root)
    warm_page_cache(root)
    tar_runs, convert_runs = [], []
    for _ in range(repeats):
        tar_out = scratch / "baseline.tar"
        tar_runs.append(time_tar(root, tar_out))
        _remove(tar_out)
        shard_out = scratch / "shards"
        convert_runs.append(time_convert(root, shard_out, workers, samples_per_shard))
        _remove(shard_out)
    tar_seconds, fsync_seconds = min(tar_runs, key=lambda r: r[0] + r[1])
    best = min(convert_runs, key=lambda r: r["seconds"])
    n, megabytes = stats["images"], stats["bytes"] / 1e6

    def rates(seconds: float) -> dict[str, float]:
        return {
            "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 1),
            "mb_per_s": round(megabytes / seconds, 1),
        }

    return {
        "dataset": stats,
        "tar": rates(tar_seconds),
        "tar_fsync": rates(tar_seconds + fsync_seconds),
        "convert": {
            **rates(best["seconds"]),
            "workers": workers,
            "shards": best["shards"],
            "output_mb": round(best["output_bytes"] / 1e6, 1),
            "peak_rss_total_mb": max(r["peak_rss_total_mb"] for r in convert_runs),
            "peak_rss_process_mb": max(r["peak_rss_process_mb"] for r in convert_runs),
        },
        "ratio_vs_tar": round(tar_seconds / best["seconds"], 3),
        "ratio_vs_tar_fsync": round((tar_seconds + fsync_seconds) / best["seconds"], 3),
    }


def run_benchmark(
    sizes: list[int],
    workers: int,
    repeats: int = 2,
    directory: Path | None = None,
    keep: bool = False,
    samples_per_shard: int | None = None,
    generate_workers: int | None = None,
) -> dict[str, Any]:
    """Generate the largest dataset once, link the smaller ones out of it, and benchmark each size."""
    if shutil.which("tar") is None:
        raise RuntimeError("the benchmark needs the tar command")
    base = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=directory))
    try:
        full = base / f"images-{max(sizes)}"
        started = time.perf_counter()
        generate_imagefolder(full, max(sizes), generate_workers or os.cpu_count() or 1)
        generated_in = time.perf_counter() - started
        results = []
        for size in sorted(sizes):
            root = full if size == max(sizes) else base / f"images-{size}"
            if root != full:
                subset_imagefolder(full, root, size)
            scratch = base / f"out-{size}"
            scratch.mkdir()
            results.append({"images": size, **bench_one(root, scratch, workers, repeats, samples_per_shard)})
        return {
            "directory": str(base),
            "generated_seconds": round(generated_in, 1),
            "repeats": repeats,
            "cpus": os.cpu_count(),
            "page_cache": "warm: every input file read once before timing; the best of the repeats counts",
            "results": results,
        }
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def render(summary: dict[str, Any]) -> str:
    lines = [
        f"bench convert: {summary['cpus']} CPUs, best of {summary['repeats']}, {summary['page_cache']}",
        f"{'images':>7} {'mean KB':>7} | {'tar img/s':>9} {'MB/s':>6} | {'tar+fsync MB/s':>14} | "
        f"{'convert img/s':>13} {'MB/s':>6} | {'vs tar':>6} {'vs tar+fsync':>12} | {'peak RSS (all / max proc)':>25}",
    ]
    for r in summary["results"]:
        c = r["convert"]
        lines.append(
            f"{r['images']:>7} {r['dataset']['mean_kb']:>7} | {r['tar']['images_per_s']:>9.0f} "
            f"{r['tar']['mb_per_s']:>6.0f} | {r['tar_fsync']['mb_per_s']:>14.0f} | {c['images_per_s']:>13.0f} "
            f"{c['mb_per_s']:>6.0f} | {r['ratio_vs_tar']:>6.0%} {r['ratio_vs_tar_fsync']:>12.0%} | "
            f"{c['peak_rss_total_mb']:>11.0f} MB / {c['peak_rss_process_mb']:>5.0f} MB"
        )
    first = summary["results"][0]
    lines.append(
        f"(convert: {first['convert']['workers']} workers, in-process, includes listing, pool start-up, "
        f"per-shard fsync and manifest; images {first['dataset']['mean_size'][0]}×{first['dataset']['mean_size'][1]} "
        f"on average, {first['dataset']['min_kb']}–{first['dataset']['max_kb']} KB)"
    )
    return "\n".join(lines)
