"""From the ``data:`` section of a config to the shard sets a run reads.

``digits`` names the built-in dataset: scikit-learn's handwritten digits, converted on first use into a
cache directory (``$CLUSTERSSL_CACHE`` or ``~/.cache/clusterssl``) with a stratified 10% hold-out, so the
demo configs run from any working directory without a prior ``shards convert``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from clusterssl.errors import PipelineError
from clusterssl.pipeline.data.shardset import ShardSet, resolve_shards
from clusterssl.errors import ShardsError

if TYPE_CHECKING:
    from clusterssl.pipeline.train.train_config import DataConfig

BUILTIN_DIGITS = "digits"
DIGITS_HOLDOUT = 0.1
DIGITS_SAMPLES_PER_SHARD = 256
"""Small shards so that the 1,618 training digits spread over several loader workers."""

DataSource = ShardSet | str | Path | Sequence[str | Path]
Split = Literal["train", "val"]


@dataclass(frozen=True)
class Dataset:
    """One resolved shard set: what the loader reads and what tracking records about it."""

    source: ShardSet
    name: str

    @property
    def num_samples(self) -> int:
        return self.source.num_indices

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def manifest_hash(self) -> str:
        return self.source.manifest.content_hash()

    @property
    def manifest_path(self) -> str | None:
        root = self.source.root
        return str(root / "manifest.json") if root is not None else None


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(
        cache_dir or os.environ.get("CLUSTERSSL_CACHE") or Path.home() / ".cache" / "clusterssl"
    ).expanduser()


def ensure_builtin_digits(
    cache_dir: str | Path | None = None, image_size: int = 32, *, workers: int = 1, progress: bool = False
) -> Path:
    """The directory holding ``train/`` and ``val/`` shard sets of the built-in digits (converted once).

    A finished conversion is detected by its manifests; an interrupted one resumes (the converter's own
    journal), and concurrent callers are serialised by the converter's lock.
    """
    root = cache_root(cache_dir) / f"digits-{image_size}px"
    if (root / "train" / "manifest.json").is_file() and (root / "val" / "manifest.json").is_file():
        return root
    from clusterssl.shards.convert import ConvertOptions, convert
    from clusterssl.shards.sources import DigitsSource

    try:
        convert(
            DigitsSource(image_size=image_size),
            root,
            ConvertOptions(
                holdout=DIGITS_HOLDOUT, samples_per_shard=DIGITS_SAMPLES_PER_SHARD, workers=workers
            ),
            progress=progress,
        )
    except ShardsError as error:
        raise PipelineError(f"preparing the built-in digits in {root}: {error}") from None
    return root


def resolve_data(
    value: str | Sequence[str] | Path,
    *,
    split: Split,
    cache_dir: str | None = None,
    image_size: int = 32,
    manifest: str | Path | None = None,
) -> Dataset:
    """A config's data value (directory, manifest, shard URLs, or ``digits``) as a Dataset.

    manifest: the set's manifest.json, for shard URLs that have none next to them (``pipe:``, http).
    """
    if isinstance(value, str) and value == BUILTIN_DIGITS:
        root = ensure_builtin_digits(cache_dir, image_size)
        return Dataset(resolve_shards(root / split), name=f"digits/{split}")
    return Dataset(resolve_shards(value, manifest), name=str(value))


def resolve_dataset(config: DataConfig, *, split: Split) -> Dataset:
    value, manifest = (
        (config.train, config.manifest) if split == "train" else (config.val, config.val_manifest)
    )
    if value is None:
        raise PipelineError(f"the config names no {split} data")
    return resolve_data(
        value,
        split=split,
        cache_dir=config.cache_dir,
        image_size=config.digits_image_size,
        manifest=manifest,
    )


def dataset_size(data: DataSource) -> int:
    """N (global indices are 0..N-1) of a shard set given in any of the loader's forms."""
    return resolve_shards(data).num_indices


def shard_set_name(data: Dataset, split: str, *, prefix: str | None = None) -> str:
    """The set's name in MLflow: ``<prefix>/<split>`` when given; else its parent and own folder
    (``fmnist/train``), ``digits/<split>`` for the built-in set, ``shards/<split>`` for URLs with no folder."""
    if prefix is not None:
        return f"{prefix}/{split}"
    if data.name == BUILTIN_DIGITS:
        return f"{BUILTIN_DIGITS}/{split}"
    root = data.source.root
    if root is None:
        return f"shards/{split}"
    return f"{root.parent.name}/{root.name}"
