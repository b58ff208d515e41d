"""The index-stable extraction pass: embed every sample once (eval view) into a feature store, row i for
global index i, whatever the shuffle, worker count or rank that produced it.

Rows are placed by the sample index carried in each Batch, never by loader position, so the bank is the
same for any loader layout. Padding (index −1) is dropped; writing a row twice or leaving one out is an
error, checked at the end. On disk the pass is resumable: the bank's written-bitmap is flushed every
``flush_every`` batches, and a re-run skips the rows already there (as per-sample repeats of 0, so they
are not even decoded). Under DDP every rank embeds its share and each batch's rows are gathered to rank
0, the only rank that keeps the bank (the others return its shape only); rank 0's bank on disk decides
what is left of a continued pass, so that every rank reads the same remaining samples.
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
from clusterssl.models.collectives import gather_cat
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
    else in memory. Under DDP every rank embeds its share and the rows are gathered to rank 0 alone,
    which returns the complete bank and writes it to disk; the other ranks return
    ``FeatureStore.without_rows`` (the bank's shape, no rows), so that no rank but 0 ever holds N × D
    floats. A bank left unfinished in ``out_dir`` by the same producer (same ``source``) is continued:
    only its missing rows are read. ``max_batches`` stops early (to test resumption) and returns the
    unfinished bank. ``shuffle=False`` reads the shards in stored order; the bank is the same either way.
    """
    settings = settings or ExtractionSettings()
    env = env or DistributedEnv()
    device = torch.device(device)
    out_path = Path(out_dir) if out_dir is not None and env.is_main else None
    num_samples = dataset_size(data)
    source = dict(source or {})
    bank = resumable_bank(out_path, num_samples, source)
    already_written, dim = _agree_on_resumed_rows(bank, num_samples, env, device)
    if bank is not None:
        bank.rows_resumed = int(already_written.sum())
    if dim > 0 and already_written.all():
        return _finished(bank, num_samples, dim, dtype, env)
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
        repeats=None if dim == 0 else (~already_written).astype(np.int64),
        shuffle=shuffle,
    )
    was_training = module.training
    module.eval()
    try:
        batches = tqdm(loader, desc="extract", unit="batch", disable=not progress, leave=False)
        for number, batch in enumerate(batches):
            features = embed_batch(module, batch, device, settings.precision)
            dim = features.shape[1]
            rows = _rows_for_rank_zero(features, batch, device, env)
            if rows is not None:
                if bank is None:
                    bank = FeatureStore.create(
                        num_samples, dim, directory=out_path, dtype=dtype, source=source
                    )
                bank.write(*(tensor.cpu().numpy() for tensor in rows))
                if (number + 1) % flush_every == 0:
                    bank.flush()
            if max_batches is not None and number + 1 >= max_batches:
                if bank is None:  # a rank other than 0
                    return FeatureStore.without_rows(num_samples, dim, dtype=dtype)
                bank.flush()
                return bank
    finally:
        module.train(was_training)
    return _finished(bank, num_samples, dim, dtype, env)


def embed_batch(module: nn.Module, batch: Batch, device: torch.device, precision: str = "fp32") -> Tensor:
    """(batch, D) float32 features of the batch's first view (the eval view), computed on ``device``."""
    views = batch.views[0].to(device, non_blocking=True)
    with autocast(device, precision):
        return module(views).float()


def _rows_for_rank_zero(
    features: Tensor, batch: Batch, device: torch.device, env: DistributedEnv
) -> tuple[Tensor, Tensor, Tensor] | None:
    """(index, features, labels) of this batch on every rank, gathered to rank 0; None on the others.

    Without DDP (one process, or a rank-0-only pass inside a torchrun world) the batch's own rows.
    Labels are -1 where the data has none; padding rows (index -1) are kept, the bank skips them.
    """
    index = batch.index.to(device)
    labels = (batch.labels if batch.labels is not None else torch.full_like(batch.index, -1)).to(device)
    if not env.is_distributed:
        return index, features, labels
    gathered_index, gathered_features, gathered_labels = (
        gather_cat(tensor) for tensor in (index, features, labels)
    )
    if gathered_index is None or gathered_features is None or gathered_labels is None:
        return None
    return gathered_index, gathered_features, gathered_labels


def _finished(
    bank: FeatureStore | None, num_samples: int, dim: int, dtype: str, env: DistributedEnv
) -> FeatureStore:
    """Rank 0 checks and closes its bank (every row written once); the other ranks get its shape only."""
    if not env.is_main:
        return FeatureStore.without_rows(num_samples, dim, dtype=dtype)
    if bank is None:
        raise PipelineError("the extraction pass saw no samples: is the data empty?")
    bank.finalize()
    return bank


def _agree_on_resumed_rows(
    bank: FeatureStore | None, num_samples: int, env: DistributedEnv, device: torch.device
) -> tuple[np.ndarray, int]:
    """Which rows a continued bank already holds, and its width (0: no bank to continue), the same on
    every rank: rank 0's bank on disk decides, so that every rank reads the same remaining samples. The
    rows themselves stay on rank 0, the only rank that keeps the bank. Returns (written (N,) bool, D)."""
    written = bank.written.copy() if bank is not None else np.zeros(num_samples, dtype=bool)
    dim = bank.meta.dim if bank is not None else 0
    if not env.is_distributed:
        return written, dim
    header = torch.tensor([dim], dtype=torch.long, device=device)
    dist.broadcast(header, src=0)
    dim = int(header[0])
    if dim == 0:
        return np.zeros(num_samples, dtype=bool), 0
    mask = torch.from_numpy(written.astype(np.uint8)).to(device)  # gloo has no bool collectives
    dist.broadcast(mask, src=0)
    return mask.cpu().numpy().astype(bool), dim


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
    already there). Under torchrun every rank embeds its share and rank 0 writes (and returns) the bank;
    the other ranks return ``FeatureStore.without_rows``.
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
