"""The index-stable extraction pass: embed every sample once (eval view) into a memory bank, row i for
global index i, whatever the shuffle, worker count or rank that produced it.

Rows are placed by the sample index carried in each Batch, never by loader position, so the bank is the
same for any loader layout. Padding (index −1) is dropped; writing a row twice or leaving one out is an
error, checked at the end. On disk the pass is resumable: the bank's written-bitmap is flushed every
``flush_every`` batches, and a re-run skips the rows already there (as per-sample repeats of 0, so they
are not even decoded).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.distributed import all_gather_cat
from pipeline.data import DataSource, dataset_size
from pipeline.distributed import DistributedEnv
from pipeline.errors import PipelineError
from pipeline.loader import build_loader
from pipeline.memory_bank import MemoryBank
from pipeline.precision import autocast
from pipeline.spec import MultiCropSpec

log = logging.getLogger(__name__)


def _resumable_bank(out_dir: Path | None, num_samples: int, source: dict[str, Any]) -> MemoryBank | None:
    """An unfinished bank of the same data and producer in ``out_dir``, to continue; else None."""
    if out_dir is None or not (out_dir / "bank.json").exists():
        return None
    try:
        bank = MemoryBank.open(out_dir, writable=True)
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
    batch_size: int = 256,
    backend: str = "auto",
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    env: DistributedEnv | None = None,
    out_dir: str | Path | None = None,
    dtype: str = "float32",
    source: dict[str, Any] | None = None,
    flush_every: int = 20,
    progress: bool = True,
    precision: str = "fp32",
    max_batches: int | None = None,
) -> MemoryBank:
    """Run ``module`` ((batch, 3, H, W) → (batch, D)) over every sample of ``data`` once.

    Returns the complete (N, D) bank — on disk under ``out_dir`` (``features.npy`` etc.) when given,
    else in memory. Under DDP every rank embeds its share, rows are all-gathered, every rank returns the
    complete bank and rank 0 writes it to disk. ``max_batches`` stops early (to test resumption) and
    returns the unfinished bank.
    """
    env = env or DistributedEnv()
    device = torch.device(device)
    out_path = Path(out_dir) if out_dir is not None and env.is_main else None
    num_samples = dataset_size(data)
    source = dict(source or {})
    bank = _resumable_bank(out_path, num_samples, source)
    repeats = None if bank is None else (~bank.written).astype(np.int64)
    loader = build_loader(
        data,
        spec,
        batch_size,
        backend=backend,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=num_workers,
        seed=0,
        epoch=0,
        device=device,
        repeats=repeats,
    )
    was_training = module.training
    module.eval()
    try:
        batches = tqdm(loader, desc="extract", unit="batch", disable=not progress, leave=False)
        for number, batch in enumerate(batches):
            views = batch.views[0].to(device, non_blocking=True)
            with autocast(device, precision):
                features = module(views).float()
            index = batch.index.to(device)
            labels = (batch.labels if batch.labels is not None else torch.full_like(batch.index, -1)).to(
                device
            )
            features, index, labels = all_gather_cat(features), all_gather_cat(index), all_gather_cat(labels)
            if bank is None:
                bank = MemoryBank.create(
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


def extract_checkpoint(
    checkpoint: str | Path,
    data: DataSource,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    dtype: str = "float32",
    backend: str = "auto",
    num_workers: int = 2,
    device: str = "auto",
    progress: bool = True,
) -> MemoryBank:
    """The bank of a run's feature extractor over ``data`` (eval view of the run's augment section).

    The bank's metadata names the checkpoint and the shard set (directory and manifest hash), which is
    what ``cluster_bank`` reads sample images back from. Re-running after an interruption continues.
    """
    from pipeline.checkpoint import load_feature_extractor
    from pipeline.distributed import resolve_device
    from pipeline.shardset import resolve_shards

    module, config = load_feature_extractor(checkpoint)
    env = DistributedEnv.from_environment()
    torch_device = resolve_device(device, env)
    shardset = resolve_shards(data)
    source = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "backbone": config.model.backbone,
        "data": str(shardset.root) if shardset.root is not None else None,
        "manifest_hash": shardset.manifest.content_hash(),
        "view": config.augment.eval_spec().describe(),
    }
    return extract_features(
        module.to(torch_device),
        shardset,
        spec=config.augment.eval_spec(),
        batch_size=batch_size,
        backend=backend,
        num_workers=num_workers,
        device=torch_device,
        env=env,
        out_dir=out_dir,
        dtype=dtype,
        source=source,
        progress=progress,
    )
