"""The sections of a training config (``configs/*.yaml``) and how a file becomes a ``TrainConfig``.

    data:     where the shards are (a directory, a manifest, shard URLs, or `digits` for the built-in set)
    augment:  the multi-crop views (a preset plus overrides)
    model:    the backbone
    method:   `name:` plus that method's own settings (checked against its config class)
    optim:    optimizer, learning rate and weight-decay schedules, clipping
    trainer:  epochs, batch size, precision, checkpoints, evaluation cadence
    tracking: MLflow store, experiment, run name

Every key can be overridden from the command line: ``--set trainer.epochs=1 --set optim.lr=0.3``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterssl.config import (
    apply_overrides,
    from_dict,
    method_config,
    read_yaml,
    resolve_config_path,
)
from clusterssl.errors import PipelineError
from clusterssl.models.method import MethodConfig
from clusterssl.models.swav import SwAVConfig
from clusterssl.pipeline.data.spec import AugmentConfig
from clusterssl.pipeline.tracking.runs import TrackingConfig
from clusterssl.pipeline.train.optim import OptimConfig
from clusterssl.pipeline.train.precision import PRECISIONS

BACKENDS = ("auto", "dali", "torch")


@dataclass
class DataConfig:
    train: str | list[str] = "digits"
    """Training shards: a shard directory, its manifest.json, a list of shard URLs (brace patterns and
    pipe: URLs for the torch backend; then `manifest` gives the counts), or `digits` (scikit-learn's
    digits, converted on first use)."""
    manifest: str | None = None
    """The manifest.json of `train` when it is given as URLs with no manifest next to them (pipe:, http)."""
    val: str | list[str] | None = None
    """Labelled shards for k-NN/NMI evaluation (same forms; `digits` = the built-in hold-out split)."""
    val_manifest: str | None = None
    """The manifest.json of `val` when it is given as URLs (see `manifest`)."""
    backend: str = "auto"
    """Augmentation backend: dali, torch, or auto (DALI when it imports)."""
    num_workers: int = 2
    """Loader worker processes per rank (torch backend) or DALI threads."""
    samples_per_epoch: int | None = None
    """Draw this many samples per epoch with replacement instead of one exact pass over the data."""
    cache_dir: str | None = None
    """Where the built-in digits are converted (default: $CLUSTERSSL_CACHE or ~/.cache/clusterssl)."""
    digits_image_size: int = 32
    """Side of the built-in digits images (8×8 originals upscaled)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise PipelineError(f"unknown backend {self.backend!r}; known: {', '.join(BACKENDS)}")


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    """Backbone name (resnet18, resnet50, resnet18_small, vit_small, …)."""
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    sync_batchnorm: bool = False
    """Convert BatchNorm to SyncBatchNorm under DDP (small per-GPU batches)."""


@dataclass
class TrainerConfig:
    epochs: int = 100
    batch_size: int = 64
    """Per rank; the global batch is batch_size × world size (the learning rate scales with it)."""
    seed: int = 0
    device: str = "auto"
    """auto (GPU when available), cpu or cuda."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16 (fp16 uses loss scaling)."""
    compile: bool = False
    """torch.compile the backbone (faster steps on GPU after a slow first step)."""
    output_dir: str = "runs/default"
    """Checkpoints, metrics.jsonl, plots and the final backbone weights go here."""
    checkpoint_every: int = 1
    """Save a checkpoint every this many epochs (always at the end and on SIGTERM/SIGINT)."""
    eval_every: int = 0
    """Run k-NN/NMI evaluation every this many epochs (0: only at the end)."""
    log_every: int = 10
    """Log averaged metrics to MLflow every this many steps."""
    eval_batch_size: int = 256
    knn_k: int = 20
    knn_temperature: float = 0.07
    threads: int | None = None
    """torch intra-op threads (default: torch's choice)."""
    wait_timeout_s: float = 6 * 3600.0
    """Under DDP, how long the other ranks wait while rank 0 clusters or evaluates alone (a CPU process
    group of its own: the default group's timeout is sized for one training step)."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PipelineError(f"unknown precision {self.precision!r}; known: {', '.join(PRECISIONS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise PipelineError("trainer.epochs and trainer.batch_size must be at least 1")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=SwAVConfig)
    """`name` plus the method's own settings; see models/<name>.py for the keys and their defaults."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def method_name(self) -> str:
        return self.method.name


def build_train_config(data: dict[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from a nested dict plus ``--set`` overrides; the method section is checked against the
    named method's own config class."""
    data = apply_overrides(dict(data), overrides)
    method = data.pop("method", None)
    if not isinstance(method, dict):
        raise PipelineError("the config needs a method section with a name (swav, dino, deepcluster, …)")
    config = from_dict(TrainConfig, data)
    config.method = method_config(method)
    check_gpu_settings(config)
    return config


def check_gpu_settings(config: TrainConfig) -> None:
    """Refuse the setting pairs known to fail on GPUs, before a job waits in a queue to find out."""
    if config.trainer.compile and config.model.sync_batchnorm:
        raise PipelineError(
            "trainer.compile and model.sync_batchnorm do not work together (torch.compile does not support "
            "SyncBatchNorm's cross-GPU statistics); set one of them to false"
        )


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    return build_train_config(read_yaml(resolve_config_path(path)), overrides)
