"""Benchmark of ``shards convert`` against plain ``tar`` over the same files, in the same run.

1. Generate an ImageFolder of ImageNet-sized photo-like JPEGs (smooth colour gradients plus sensor-like
   noise, 400–500 × 330–410 pixels, about 50 KB at quality 90), 10 classes, in parallel, seeded.
2. Read every file once so both contenders start from a warm page cache.
3. Time ``tar cf`` over the tree, then the fsync of its output (reported separately: the converter fsyncs
   each shard before renaming it, so ``tar + fsync`` is the like-for-like baseline).
4. Time ``convert()`` (in this process, so interpreter start-up is not counted; the worker pool's
   start-up is).
5. Convert once more while a thread samples the memory of this process and all its children every
   20 ms, for the peak memory (not timed: the sampler takes CPU from the workers).
Both also report CPU seconds per image (all their processes): on a shared machine the wall-clock rates
move with the other load, the CPU cost much less.
Each contender runs ``repeats`` times; the fastest run counts. Outputs are deleted between runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
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

from clusterssl.shards.convert import ConvertOptions, convert
from clusterssl.shards.native import describe_loop
from clusterssl.shards.parallel import TaskRunner
from clusterssl.shards.sources import ImageFolderSource

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
    from tqdm import tqdm

    with TaskRunner(workers) as runner, tqdm(total=count, unit="img", desc="generate") as bar:
        for done in runner.map_unordered(_generate, tasks):
            bar.update(done)


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


class ProcessTreeMemory:
    """Samples the memory of this process plus all its descendants (Linux /proc) every ``interval``
    seconds and keeps the peak of their sum, by PSS (shared pages split between the processes that map
    them, so forked workers are not charged for the parent's pages) and the largest single RSS."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.baseline = 0
        """PSS of the tree when sampling started (this process alone, before the conversion)."""
        self.peak_total = 0
        self.peak_rss_total = 0
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

    def _pss_and_rss(self, pid: int) -> tuple[int, int]:
        try:
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self._page
        except (OSError, IndexError, ValueError):
            return 0, 0
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024, rss
        except (OSError, IndexError, ValueError):
            pass
        return rss, rss  # no smaps_rollup: RSS overstates shared pages, but is an upper bound

    def sample(self) -> None:
        sizes = [self._pss_and_rss(pid) for pid in self._tree(os.getpid())]
        self.baseline = self.baseline or sum(pss for pss, _ in sizes)
        self.peak_total = max(self.peak_total, sum(pss for pss, _ in sizes))
        self.peak_rss_total = max(self.peak_rss_total, sum(rss for _, rss in sizes))
        self.peak_process = max(self.peak_process, max((rss for _, rss in sizes), default=0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> ProcessTreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that have been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def time_tar(root: Path, out: Path) -> dict[str, float]:
    """Wall seconds of ``tar cf``, of the fsync of its output that follows, and tar's CPU seconds."""
    load = os.getloadavg()[0]
    cpu = cpu_seconds()
    started = time.perf_counter()
    subprocess.run(["tar", "cf", str(out), "-C", str(root), "."], check=True)
    tar_done = time.perf_counter()
    fsync_path(out)
    return {
        "seconds": tar_done - started,
        "fsync_seconds": time.perf_counter() - tar_done,
        "cpu_seconds": cpu_seconds() - cpu,
        "load": load,
    }


def time_convert(
    root: Path, out: Path, workers: int, samples_per_shard: int | None, sample_memory: bool = False
) -> dict[str, Any]:
    """One conversion: its wall and CPU seconds, or (``sample_memory``) its peak memory.

    The memory sampler reads ``/proc/<pid>/smaps_rollup`` of every process every 20 ms, which costs
    CPU the workers would otherwise have (measured: 53-65% of tar's rate with it, 68-77% without, in
    the same runs), so timed runs go without it and the peak comes from a run of its own."""
    load = os.getloadavg()[0]
    cpu = cpu_seconds()
    sampler = ProcessTreeMemory() if sample_memory else contextlib.nullcontext()
    with sampler:
        started = time.perf_counter()
        outcome = convert(
            ImageFolderSource(root), out, ConvertOptions(samples_per_shard=samples_per_shard, workers=workers)
        )
        seconds = time.perf_counter() - started
    manifest = outcome.sets[0].manifest
    assert manifest.count == outcome.inputs and not manifest.skipped, (
        "the benchmark data must convert cleanly"
    )
    result: dict[str, Any] = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds() - cpu,
        "load": load,
        "shards": len(manifest.shards),
        "output_bytes": sum(s.bytes for s in manifest.shards),
    }
    if isinstance(sampler, ProcessTreeMemory):
        result.update(
            peak_pss_total_mb=round(sampler.peak_total / 2**20, 1),
            peak_rss_total_mb=round(sampler.peak_rss_total / 2**20, 1),
            peak_rss_process_mb=round(sampler.peak_process / 2**20, 1),
            pss_before_mb=round(sampler.baseline / 2**20, 1),
        )
    return result


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
    shard_out = scratch / "shards"
    for _ in range(repeats):
        tar_out = scratch / "baseline.tar"
        tar_runs.append(time_tar(root, tar_out))
        _remove(tar_out)
        convert_runs.append(time_convert(root, shard_out, workers, samples_per_shard))
        _remove(shard_out)
    memory = time_convert(root, shard_out, workers, samples_per_shard, sample_memory=True)
    _remove(shard_out)
    tar = min(tar_runs, key=lambda r: r["seconds"] + r["fsync_seconds"])
    best = min(convert_runs, key=lambda r: r["seconds"])
    n, megabytes = stats["images"], stats["bytes"] / 1e6

    def rates(seconds: float, cpu: float) -> dict[str, float]:
        return {
            "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 1),
            "mb_per_s": round(megabytes / seconds, 1),
            "cpu_us_per_image": round(cpu / n * 1e6, 1),
        }

    return {
        "dataset": stats,
        "tar": {**rates(tar["seconds"], tar["cpu_seconds"]), "load": round(tar["load"], 2)},
        "tar_fsync": rates(tar["seconds"] + tar["fsync_seconds"], tar["cpu_seconds"]),
        "convert": {
            **rates(best["seconds"], best["cpu_seconds"]),
            "load": round(best["load"], 2),
            "workers": workers,
            "shards": best["shards"],
            "output_mb": round(best["output_bytes"] / 1e6, 1),
            "peak_pss_total_mb": memory["peak_pss_total_mb"],
            "peak_rss_total_mb": memory["peak_rss_total_mb"],
            "peak_rss_process_mb": memory["peak_rss_process_mb"],
            "pss_before_mb": memory["pss_before_mb"],
        },
        "ratio_vs_tar": round(tar["seconds"] / best["seconds"], 3),
        "ratio_vs_tar_fsync": round((tar["seconds"] + tar["fsync_seconds"]) / best["seconds"], 3),
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
            "per_sample_loop": describe_loop(),
            "results": results,
        }
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def render(summary: dict[str, Any]) -> str:
    lines = [
        f"bench convert: {summary['cpus']} CPUs, best of {summary['repeats']}; {summary['page_cache']}",
        f"{'images':>6} {'KB':>4} | {'tar img/s':>9} {'MB/s':>5} {'µs cpu':>6} | {'+fsync MB/s':>11} | "
        f"{'convert img/s':>13} {'MB/s':>5} {'µs cpu':>6} | {'vs tar':>6} {'vs +fsync':>9} | "
        f"{'peak memory: PSS (before) / RSS sum / max RSS':>45} | load",
    ]
    for r in summary["results"]:
        c, t = r["convert"], r["tar"]
        memory = (
            f"{c['peak_pss_total_mb']:.0f} ({c['pss_before_mb']:.0f}) / {c['peak_rss_total_mb']:.0f} / "
            f"{c['peak_rss_process_mb']:.0f} MB"
        )
        lines.append(
            f"{r['images']:>6} {r['dataset']['mean_kb']:>4.0f} | {t['images_per_s']:>9.0f} {t['mb_per_s']:>5.0f} "
            f"{t['cpu_us_per_image']:>6.0f} | {r['tar_fsync']['mb_per_s']:>11.0f} | {c['images_per_s']:>13.0f} "
            f"{c['mb_per_s']:>5.0f} {c['cpu_us_per_image']:>6.0f} | {r['ratio_vs_tar']:>6.0%} "
            f"{r['ratio_vs_tar_fsync']:>9.0%} | {memory:>45} | {t['load']:.1f}"
        )
    first = summary["results"][0]
    lines.append(
        f"convert: {first['convert']['workers']} workers, in-process (listing, pool start-up, per-shard fsync and "
        f"manifest included); MB/s of input; µs cpu = CPU time per image of all processes; memory = this "
        f"process and its workers (PSS before the conversion in brackets); load = 1-min load average before "
        f"the tar run; images {first['dataset']['mean_size'][0]}×{first['dataset']['mean_size'][1]} on average, "
        f"{first['dataset']['min_kb']}–{first['dataset']['max_kb']} KB; per-sample loop: {summary['per_sample_loop']}"
    )
    return "\n".join(lines)
