"""The index-stable extraction pass: embed every sample once (eval view) into a feature store, row i for
global index i, whatever the shuffle, worker count or rank that produced it.

Rows are placed by the sample index carried in each Batch, never by loader position, so the bank is the
same for any loader layout. Padding (index −1) is dropped; writing a row twice or leaving one out is an
error, checked at the end. On disk the pass is resumable: the bank's written-bitmap is flushed every
``flush_every`` batches, and a re-run skips the rows already there (as per-sample repeats of 0, so they
are not even decoded). Under DDP rank 0's bank on disk decides what is left and hands the rows already
written to the other ranks, so that every rank reads the same remaining samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from clusterssl.errors import PipelineError
from clusterssl.models.collectives import all_gather_cat
from clusterssl.models.types import Batch
from clusterssl.pipeline.data.datasets import DataSource, dataset_size
from clusterssl.pipeline.data.loader import build_loader
from clusterssl.pipeline.data.shardset import resolve_shards
from clusterssl.pipeline.data.spec import MultiCropSpec
from clusterssl.pipeline.features.store import FeatureStore
from clusterssl.pipeline.train.lock import lock_directory
from clusterssl.pipeline.train.precision import autocast
from clusterssl.pipeline.train.world import DistributedEnv
from clusterssl.shards.tario import file_sha256

log = logging.getLogger(__name__)

ROWS_PER_BROADCAST = 65536
"""Rows of a resumed bank sent from rank 0 to the other ranks at once (bounds the temporary memory)."""


@dataclass(frozen=True)
class ExtractionSettings:
    """How an extraction pass reads and embeds (not what): one value built by `clusterssl extract`,
    `clusterssl eval`, the pipeline runner and the trainer, read by ``extract_features``."""

    batch_size: int = 256
    backend: str = "auto"
    """Loader backend: auto (DALI on a GPU, torch otherwise), dali or torch."""
    num_workers: int = 2
    """Loader workers (torch) or DALI threads."""
    precision: str = "fp32"
    """Autocast of the forward: fp32, bf16 or fp16, already resolved (see ``clusterssl.pipeline.train.precision``)."""


def resumable_bank(out_dir: Path | None, num_samples: int, source: dict[str, Any]) -> FeatureStore | None:
    """An unfinished bank of the same data and producer in ``out_dir``, to continue; else None."""
    if out_dir is None or not (out_dir / "bank.json").exists():
        return None
    try:
        bank = FeatureStore.open(out_dir, writable=True)
    except PipelineError:
        return None
    if bank.meta.complete or bank.meta.num_samples != num_samples or bank.meta.source != source:
        return None
    log.info(
        "resuming the extraction into %s: %d of %d rows already written",
        out_dir,
        bank.num_written,
        num_samples,
    )
    return bank


@torch.no_grad()
def extract_features(
    module: nn.Module,
    data: DataSource,
    *,
    spec: MultiCropSpec,
    settings: ExtractionSettings | None = None,
    device: torch.device | str = "cpu",
    env: DistributedEnv | None = None,
    out_dir: str | Path | None = None,
    dtype: str = "float32",
    source: dict[str, Any] | None = None,
    flush_every: int = 20,
    progress: bool = True,
    max_batches: int | None = None,
    shuffle: bool = True,
) -> FeatureStore:
    """Run ``module`` ((batch, 3, H, W) → (batch, D)) over every sample of ``data`` once.

    Returns the complete (N, D) bank — on disk under ``out_dir`` (``features.npy`` etc.) when given,
    else in memory. Under DDP every rank embeds its share, rows are all-gathered, every rank returns the
    complete bank and rank 0 writes it to disk. A bank left unfinished in ``out_dir`` by the same producer
    (same ``source``) is continued: only its missing rows are read. ``max_batches`` stops early (to test
    resumption) and returns the unfinished bank. ``shuffle=False`` reads the shards in stored order; the
    bank is the same either way.
    """
    settings = settings or ExtractionSettings()
    env = env or DistributedEnv()
    device = torch.device(device)
    out_path = Path(out_dir) if out_dir is not None and env.is_main else None
    num_samples = dataset_size(data)
    source = dict(source or {})
    bank = resumable_bank(out_path, num_samples, source)
    bank, already_written = _share_resumed_rows(bank, num_samples, dtype, env, device)
    if bank is not None:
        bank.rows_resumed = int(already_written.sum())
    if bank is not None and already_written.all():
        bank.finalize()
        return bank
    loader = build_loader(
        data,
        spec,
        settings.batch_size,
        backend=settings.backend,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=settings.num_workers,
        seed=0,
        epoch=0,
        device=device,
        repeats=None if bank is None else (~already_written).astype(np.int64),
        shuffle=shuffle,
    )
    was_training = module.training
    module.eval()
    try:
        batches = tqdm(loader, desc="extract", unit="batch", disable=not progress, leave=False)
        for number, batch in enumerate(batches):
            features = embed_batch(module, batch, device, settings.precision)
            index = batch.index.to(device)
            labels = (batch.labels if batch.labels is not None else torch.full_like(batch.index, -1)).to(
                device
            )
            features, index, labels = all_gather_cat(features), all_gather_cat(index), all_gather_cat(labels)
            if bank is None:
                bank = FeatureStore.create(
                    num_samples, features.shape[1], directory=out_path, dtype=dtype, source=source
                )
            bank.write(index.cpu().numpy(), features.cpu().numpy(), labels.cpu().numpy())
            if (number + 1) % flush_every == 0:
                bank.flush()
            if max_batches is not None and number + 1 >= max_batches:
                bank.flush()
                return bank
    finally:
        module.train(was_training)
    if bank is None:
        raise PipelineError("the extraction pass saw no samples: is the data empty?")
    bank.finalize()
    return bank


def embed_batch(module: nn.Module, batch: Batch, device: torch.device, precision: str = "fp32") -> Tensor:
    """(batch, D) float32 features of the batch's first view (the eval view), computed on ``device``."""
    views = batch.views[0].to(device, non_blocking=True)
    with autocast(device, precision):
        return module(views).float()


def _share_resumed_rows(
    bank: FeatureStore | None, num_samples: int, dtype: str, env: DistributedEnv, device: torch.device
) -> tuple[FeatureStore | None, np.ndarray]:
    """Make every rank agree on a resumed bank: which rows are already written (rank 0's bank on disk
    decides) and, on the other ranks, an in-feature store holding those rows, so that every rank reads the
    same remaining samples and ends with the complete bank. Returns (bank or None, written (N,) bool)."""
    written = bank.written.copy() if bank is not None else np.zeros(num_samples, dtype=bool)
    if not env.is_distributed:
        return bank, written
    header = torch.tensor([bank.meta.dim if bank is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(header, src=0)
    dim = int(header[0])
    if dim == 0:
        return None, written
    mask = torch.from_numpy(written.astype(np.uint8)).to(device)  # gloo has no bool collectives
    dist.broadcast(mask, src=0)
    written = mask.cpu().numpy().astype(bool)
    if not env.is_main:
        bank = FeatureStore.create(num_samples, dim, directory=None, dtype=dtype)
    assert bank is not None
    rows = np.flatnonzero(written)
    for start in range(0, rows.size, ROWS_PER_BROADCAST):
        chunk = rows[start : start + ROWS_PER_BROADCAST]
        features = torch.zeros(chunk.size, dim, dtype=torch.float32, device=device)
        labels = torch.zeros(chunk.size, dtype=torch.long, device=device)
        if env.is_main:
            features.copy_(torch.from_numpy(np.asarray(bank.features[chunk], dtype=np.float32)))
            labels.copy_(torch.from_numpy(bank.labels[chunk]))
        dist.broadcast(features, src=0)
        dist.broadcast(labels, src=0)
        if not env.is_main:
            bank.write(chunk, features.cpu().numpy(), labels.cpu().numpy())
    return bank, written


def extract_checkpoint(
    checkpoint: str | Path,
    data: DataSource,
    out_dir: str | Path,
    *,
    split: str = "train",
    settings: ExtractionSettings | None = None,
    dtype: str = "float32",
    device: str = "auto",
    progress: bool = True,
    manifest: str | Path | None = None,
) -> FeatureStore:
    """The bank of a run's feature extractor over ``data`` (eval view of the run's augment section).

    checkpoint: a checkpoint.pt, a backbone.pt or a run directory holding either.
    data:       a shard set in any of the loader's forms, or ``digits`` (then ``split`` says which).
    manifest:   the set's manifest.json when ``data`` is URLs with none next to them (``pipe:``, http).
    The bank's metadata names the checkpoint (path and sha256) and the shard set (directory, manifest
    hash and path), which is what ``cluster_bank`` reads sample images back from, and the view.
    Re-running after an interruption continues the bank (``bank.rows_resumed`` says how many rows were
    already there). Under torchrun every rank embeds its share and rank 0 writes.
    """
    from clusterssl.pipeline.data.datasets import resolve_data
    from clusterssl.pipeline.train.checkpoint import BACKBONE_NAME, LAST_NAME, load_feature_extractor
    from clusterssl.pipeline.train.world import init_distributed, resolve_device

    if split not in ("train", "val"):
        raise PipelineError(f"split must be train or val, got {split!r}")
    checkpoint_path = Path(checkpoint)
    if checkpoint_path.is_dir():
        has_checkpoint = (checkpoint_path / LAST_NAME).exists()
        checkpoint_path = checkpoint_path / (LAST_NAME if has_checkpoint else BACKBONE_NAME)
    module, config = load_feature_extractor(checkpoint_path)
    env = DistributedEnv.from_environment()
    torch_device = resolve_device(device, env)
    init_distributed(env, torch_device)
    if isinstance(data, (str, Path)):
        shardset = resolve_data(
            data,
            split=split,  # type: ignore[arg-type]
            cache_dir=config.data.cache_dir,
            image_size=config.data.digits_image_size,
            manifest=manifest,
        ).source
    else:
        shardset = resolve_shards(data, manifest)
    root = shardset.root
    spec = config.augment.eval_spec()
    source = {
        "checkpoint": str(checkpoint_path.resolve()),
        "checkpoint_sha256": file_sha256(checkpoint_path),
        "backbone": config.model.backbone,
        "data": str(root) if root is not None else None,
        "manifest_hash": shardset.manifest.content_hash(),
        "manifest_path": str(root / "manifest.json") if root is not None else None,
        "view": spec.describe(),
    }
    with lock_directory(
        out_dir, owner="extraction", hint="choose another --out", env=env, device=torch_device
    ):
        return extract_features(
            module.to(torch_device),
            shardset,
            spec=spec,
            settings=settings,
            device=torch_device,
            env=env,
            out_dir=out_dir,
            dtype=dtype,
            source=source,
            progress=progress and env.is_main,
        )
