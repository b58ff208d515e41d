"""The DALI backend: ``fn.readers.webdataset`` + DALI decode and per-view ops, fed the epoch plan.

One pipeline per (rank, epoch), built from the plan so that DALI reads exactly the planned samples in the
planned order:

    plan (pipeline.data.epoch, one unit) ──► a temporary DALI index per run of slots in one shard, listing
        those samples' index lines in slot order (a sample repeated is listed twice, a skipped one not
        at all, a corrupt one replaced by a good sample of its batch) ──► readers.webdataset(paths,
        index_paths, ext jpg/label/index, dtypes UINT8/INT64/INT64, no DALI shuffle: the plan already
        permuted shards and samples from (seed, epoch))
    decoders.image (``mixed`` = nvJPEG on a GPU, CPU otherwise; decoded once per sample)
    per view, parameters from ``pipeline.data.augment`` through external_source (the same draws as the torch
    backend, keyed by sample, so resuming at batch k just starts the index files at slot k·batch):
        resize with an ROI (the crop box; antialiased linear) ─► colour: coord_transform by the 3×3
        matrix + mean-luma × offset, clamped ─► gaussian_blur (conditional) ─► solarise as
        min(x, 255 − x) (conditional) ─► crop_mirror_normalize (flip, normalise, CHW float)

Without a GPU the same graph runs on the CPU with ``device_id=None``. Corrupt samples are found before the
pipeline is built (``pipeline.data.integrity``: truncated tars from the index offsets, bad JPEGs by a
structural check, cached in a sidecar), because DALI stops on them; each rank checks only the shards its
share of the epoch reads.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterssl.pipeline.data.augment import ViewParams, draw_params
from clusterssl.pipeline.data.epoch import PADDING_REPEAT, RankPlan
from clusterssl.errors import PipelineError
from clusterssl.pipeline.data.integrity import ShardCheck, check_shard_set
from clusterssl.pipeline.data.shardset import ShardSet
from clusterssl.pipeline.data.spec import MultiCropSpec, ViewSpec
from clusterssl.pipeline.data.torch_backend import WorkerBatch
from clusterssl.shards.format import FORMAT_VERSION, IMAGE_EXT, INDEX_EXT, LABEL_EXT, stored_ext


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ReadList:
    """What DALI reads for one rank's epoch (from ``start_batch``): slot by slot."""

    shard: np.ndarray  # (S,) shard read for each slot
    position: np.ndarray  # (S,) position read
    aug_index: np.ndarray  # (S,) augmentation key: global index of the sample read
    aug_repeat: np.ndarray  # (S,)
    padding: np.ndarray  # (S,) bool: padding (planned, or replacing a corrupt sample)
    height: np.ndarray  # (S,) decoded image size (from the JPEG header)
    width: np.ndarray
    corrupt: list[list[tuple[str, str]]]  # per batch: (where, reason) of the samples skipped


def plan_reads(
    shardset: ShardSet, plan: RankPlan, checks: dict[int, ShardCheck], start_batch: int
) -> ReadList:
    """Replace corrupt samples by good ones of the same batch and attach the image sizes.

    ``checks``: the check of every shard the plan reads, by shard number."""
    batch_size = plan.batch_size
    first = start_batch * batch_size
    shard, position = plan.shard[first:].copy(), plan.position[first:].copy()
    aug_index, aug_repeat = plan.index[first:].copy(), plan.repeat[first:].copy()
    padding = plan.padding[first:].copy()
    status = _per_slot(checks, "status", shard, position)
    fallback = _first_good(plan, checks)
    corrupt: list[list[tuple[str, str]]] = []
    for start in range(0, len(shard), batch_size):
        rows = np.arange(start, start + batch_size)
        bad, good = rows[status[rows] != 0], rows[status[rows] == 0]
        corrupt.append(
            [
                (
                    shardset.shards[shard[r]].where(int(position[r])),
                    checks[int(shard[r])].reasons.get(int(position[r]), "bad"),
                )
                for r in bad
                if not padding[r]
            ]
        )
        for k, r in enumerate(bad):
            if len(good):
                source = good[k % len(good)]
                shard[r], position[r], aug_index[r] = shard[source], position[source], aug_index[source]
            else:
                shard[r], position[r], aug_index[r] = fallback
            aug_repeat[r], padding[r] = PADDING_REPEAT + first + r, True
    height = _per_slot(checks, "height", shard, position).astype(np.int64)
    width = _per_slot(checks, "width", shard, position).astype(np.int64)
    return ReadList(shard, position, aug_index, aug_repeat, padding, height, width, corrupt)


def _per_slot(
    checks: dict[int, ShardCheck], name: str, shard: np.ndarray, position: np.ndarray
) -> np.ndarray:
    """The check's array ``name`` (status, height or width) at each slot's (shard, position)."""
    numbers = sorted(checks)
    starts = np.zeros(numbers[-1] + 1, np.int64)
    starts[numbers] = np.cumsum([0] + [len(checks[n].status) for n in numbers])[:-1]
    return np.concatenate([getattr(checks[n], name) for n in numbers])[starts[shard] + position]


def _first_good(plan: RankPlan, checks: dict[int, ShardCheck]) -> tuple[int, int, int]:
    for slot in np.flatnonzero(~plan.padding):
        shard, position = int(plan.shard[slot]), int(plan.position[slot])
        if checks[shard].status[position] == 0:
            return shard, position, int(plan.index[slot])
    raise PipelineError("no sample of this rank's share of the epoch can be read: the data is unusable")


def write_index_files(shardset: ShardSet, reads: ReadList, directory: Path) -> tuple[list[str], list[str]]:
    """One DALI index per run of consecutive slots in the same shard, lines in slot order."""
    lines_of: dict[int, list[str]] = {}
    paths, index_paths = [], []
    breaks = np.flatnonzero(np.r_[True, reads.shard[1:] != reads.shard[:-1], True])
    for run, (start, stop) in enumerate(itertools.pairwise(breaks)):
        shard_id = int(reads.shard[start])
        shard = shardset.shards[shard_id]
        if shard_id not in lines_of:
            assert shard.index_path is not None
            lines_of[shard_id] = shard.index_path.read_text(encoding="utf-8").splitlines()[1:]
        lines = lines_of[shard_id]
        chosen = [lines[p] for p in reads.position[start:stop]]
        index_path = directory / f"run-{run:06d}.idx"
        index_path.write_text(f"v1.2 {len(chosen)}\n" + "\n".join(chosen) + "\n", encoding="utf-8")
        paths.append(str(shard.local_path))
        index_paths.append(str(index_path))
    return paths, index_paths


class _ParamSource:
    """external_source callback: the parameters of iteration i's batch, packed per view."""

    def __init__(
        self, spec: MultiCropSpec, reads: ReadList, batch_size: int, seed: int, epoch: int, gpu: bool
    ) -> None:
        self.spec, self.reads, self.batch_size, self.gpu = spec, reads, batch_size, gpu
        self.seed, self.epoch = seed, epoch
        self.num_batches = len(reads.shard) // batch_size

    def __call__(self, info: Any) -> list[np.ndarray]:
        # DALI prefetches past the last batch: its reader then wraps around to the first samples (the
        # list holds whole batches), so the parameters must wrap too or the crop boxes would not fit.
        batch = int(info.iteration) % self.num_batches
        rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
        r = self.reads
        params = draw_params(
            self.spec,
            self.seed,
            self.epoch,
            r.aug_index[rows],
            r.aug_repeat[rows],
            r.height[rows],
            r.width[rows],
        )
        packed = []
        for view, p in zip(self.spec.views, params, strict=True):
            fields = _pack(p)
            packed.extend(fields[name] for name in view_fields(view, self.gpu))
        return packed


def view_fields(view: ViewSpec, gpu: bool) -> list[str]:
    """The external inputs one view's ops use (an unused external output costs DALI a warning)."""
    fields = ["start", "end", "mirror"]
    if view.uses_color:
        fields += ["lin", "off"] if gpu else ["lin34", "off34"]
    if view.blur_p > 0:
        fields += ["blur", "sigma"]
    if view.solarize_p > 0:
        fields += ["solarize"]
    return fields


def _pack(p: ViewParams) -> dict[str, np.ndarray]:
    return {
        "start": np.stack([p.top, p.left], axis=1).astype(np.float32),
        "end": np.stack([p.top + p.height, p.left + p.width], axis=1).astype(np.float32),
        "mirror": p.flip.astype(np.int32),
        "lin": np.ascontiguousarray(p.lin, dtype=np.float32),
        "off": np.ascontiguousarray(p.off, dtype=np.float32),
        # the same map as a 3×4 [matrix | offset] pair: MT = lin34 + mean_luma * off34
        "lin34": np.concatenate([p.lin, np.zeros((len(p), 3, 1), np.float32)], axis=2),
        "off34": np.concatenate([np.zeros((len(p), 3, 3), np.float32), p.off[:, :, None]], axis=2),
        "blur": p.sigma > 0,
        "sigma": np.maximum(p.sigma, 1e-3).astype(np.float32),  # ignored where blur is off, must be valid
        "solarize": p.solarize.copy(),
    }


def _view_graph(image: Any, view: ViewSpec, params: dict[str, Any], spec: MultiCropSpec, gpu: bool) -> Any:
    """DALI ops of one view (see the module docstring); ``params`` are the view's external inputs."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    v = fn.resize(
        image,
        size=[view.size, view.size],
        roi_start=params["start"],
        roi_end=params["end"],
        roi_relative=False,
        antialias=True,
        interp_type=types.INTERP_LINEAR,
    )
    if view.uses_color:
        # out = lin @ rgb + mean_luma * off: the 3×3 part as an operator, the mean-dependent offset as
        # arithmetic (argument inputs must live on the CPU, the mean of a GPU image does not).
        channel_mean = fn.reductions.mean(v, axes=[0, 1])
        luma = channel_mean[0] * 0.299 + channel_mean[1] * 0.587 + channel_mean[2] * 0.114
        if gpu:
            shifted = fn.coord_transform(v, M=params["lin"], dtype=types.FLOAT) + luma * params["off"].gpu()
            v = fn.cast(dmath.clamp(shifted, 0.0, 255.0), dtype=types.UINT8)
        else:  # on the CPU the mean is a CPU value: one uint8 pass (rounds and clamps) does it all
            v = fn.coord_transform(v, MT=params["lin34"] + luma * params["off34"], dtype=types.UINT8)
    # The outer ifs are Python (is the op in the graph at all); the inner ones DALI per-sample conditionals.
    if view.blur_p > 0:  # noqa: SIM102
        if params["blur"]:
            v = fn.gaussian_blur(v, sigma=params["sigma"])
    if view.solarize_p > 0:  # noqa: SIM102
        if params["solarize"]:
            v = dmath.min(v, types.Constant(255, dtype=types.UINT8) - v)
    return fn.crop_mirror_normalize(
        v,
        mirror=params["mirror"],
        mean=[255.0 * m for m in spec.mean],
        std=[255.0 * s for s in spec.std],
        output_layout="CHW",
        dtype=types.FLOAT,
    )


def build_pipeline(
    spec: MultiCropSpec,
    paths: list[str],
    index_paths: list[str],
    source: _ParamSource,
    *,
    batch_size: int,
    num_threads: int,
    device: torch.device,
    format_version: int = FORMAT_VERSION,
) -> Any:
    """``format_version``: the shard set's, which names the typed components in its tars."""
    from nvidia.dali import fn, pipeline_def, types

    exts = [stored_ext(ext, format_version) for ext in (IMAGE_EXT, LABEL_EXT, INDEX_EXT)]

    gpu = device.type == "cuda"

    @pipeline_def(enable_conditionals=True)
    def multicrop() -> tuple[Any, ...]:
        jpeg, label, index = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=exts,
            dtypes=[types.UINT8, types.INT64, types.INT64],
            random_shuffle=False,
            name="reader",
        )
        image = fn.decoders.image(
            jpeg, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False
        )
        names = [view_fields(view, gpu) for view in spec.views]
        inputs = iter(
            fn.external_source(source=source, num_outputs=sum(map(len, names)), batch=True, batch_info=True)
        )
        # (no zip here: DALI's AutoGraph rewrites zip inside pipeline functions and refuses strict=)
        views = [
            _view_graph(image, view, {name: next(inputs) for name in names[v]}, spec, gpu)
            for v, view in enumerate(spec.views)
        ]
        return (*views, label, index)

    pipe = multicrop(
        batch_size=batch_size,
        num_threads=max(1, num_threads),
        device_id=(device.index or 0) if gpu else None,
        prefetch_queue_depth=2,
    )
    pipe.build()
    return pipe


def _to_torch(output: Any, device: torch.device) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = output.as_tensor()
    target = torch.empty(tuple(tensor.shape()), dtype=_TORCH_DTYPE[str(tensor.dtype)], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    return feed_ndarray(tensor, target, cuda_stream=stream)


_TORCH_DTYPE = {"DALIDataType.FLOAT": torch.float32, "DALIDataType.INT64": torch.int64}


def iterate_dali(
    shardset: ShardSet,
    plan: RankPlan,
    spec: MultiCropSpec,
    *,
    seed: int,
    epoch: int,
    start_batch: int,
    num_threads: int,
    device: torch.device,
    cache_dir: str | Path | None = None,
) -> Iterator[WorkerBatch]:
    """The rank's batches from ``start_batch`` on, views on ``device``."""
    if not shardset.indexed:
        raise PipelineError("the DALI backend reads local shards with their .idx files; use backend='torch'")
    if plan.num_units != 1:
        raise ValueError("the DALI backend reads the plan as one unit")
    if start_batch >= plan.num_batches:
        return
    # Only the shards this rank reads (all of its plan: a resumed epoch must pick the fallback sample an
    # uninterrupted one would), so the ranks share the first check of a shard set instead of each doing it.
    numbers = np.unique(plan.shard).tolist()
    found = check_shard_set(shardset, cache_dir=cache_dir, progress=True, shards=numbers)
    checks = dict(zip(numbers, found, strict=True))
    reads = plan_reads(shardset, plan, checks, start_batch)
    batch_size = plan.batch_size
    with tempfile.TemporaryDirectory(prefix="clusterssl-dali-") as tmp:
        paths, index_paths = write_index_files(shardset, reads, Path(tmp))
        source = _ParamSource(spec, reads, batch_size, seed, epoch, gpu=device.type == "cuda")
        pipe = build_pipeline(
            spec,
            paths,
            index_paths,
            source,
            batch_size=batch_size,
            num_threads=num_threads,
            device=device,
            format_version=shardset.manifest.format_version,
        )
        first_index = np.array([s.first_index for s in shardset.shards], np.int64)
        for k in range(source.num_batches):
            outputs = pipe.run()
            rows = slice(k * batch_size, (k + 1) * batch_size)
            read_index = _to_torch(outputs[-1], torch.device("cpu")).view(-1).numpy()
            expected = first_index[reads.shard[rows]] + reads.position[rows]
            if not np.array_equal(read_index, expected):
                raise PipelineError("DALI read samples in an unexpected order (index files out of sync)")
            labels = _to_torch(outputs[-2], torch.device("cpu")).view(-1)
            yield WorkerBatch(
                number=start_batch + k,
                views=[_to_torch(o, device) for o in outputs[: len(spec.views)]],
                labels=labels,
                index=torch.from_numpy(np.where(reads.padding[rows], -1, read_index)),
                corrupt=reads.corrupt[k],
            )
