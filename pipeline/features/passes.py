"""The passes over whole data sets that a training run makes besides its steps: the extraction pass a
method asks for (clustering), the evaluation of the feature extractor, and the val images of the plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clusterssl.models.types import FeatureBank
from clusterssl.pipeline.data.datasets import Dataset
from clusterssl.pipeline.data.loader import build_loader
from clusterssl.pipeline.data.spec import MultiCropSpec
from clusterssl.pipeline.features.evaluation import EvalResult, evaluate_features, extract_eval_features
from clusterssl.pipeline.features.extraction import ExtractionSettings, extract_features
from clusterssl.pipeline.train.world import DistributedEnv, on_rank0

if TYPE_CHECKING:
    from clusterssl.pipeline.train.train_config import TrainConfig


@dataclass
class RunPasses:
    """A run's data sets and how it reads them under the eval view, ``settings`` as the standalone
    extraction does; stores of extraction passes go under ``output_dir/bank-{name}``."""

    train: Dataset
    val: Dataset | None
    eval_spec: MultiCropSpec
    settings: ExtractionSettings
    device: torch.device
    env: DistributedEnv
    output_dir: Path
    progress: bool
    wait_group: Any = None
    """The process group the other ranks wait on while rank 0 evaluates (None: the default group)."""

    @classmethod
    def for_run(
        cls,
        config: TrainConfig,
        train: Dataset,
        val: Dataset | None,
        precision: str,
        device: torch.device,
        env: DistributedEnv,
        *,
        progress: bool,
        wait_group: Any = None,
    ) -> RunPasses:
        """The passes of a training run: they read and embed like the standalone extraction, with the
        run's data settings, ``trainer.eval_batch_size`` and the training precision."""
        settings = ExtractionSettings(
            batch_size=config.trainer.eval_batch_size,
            backend=config.data.backend,
            num_workers=config.data.num_workers,
            precision=precision,
        )
        output_dir = Path(config.trainer.output_dir)
        eval_spec = config.augment.eval_spec()
        return cls(train, val, eval_spec, settings, device, env, output_dir, progress, wait_group)

    def extract(self, module: nn.Module, *, name: str, epoch: int) -> FeatureBank:
        """``module`` over every training sample once (eval view), row i for sample i; a pass interrupted
        at the same ``epoch`` resumes from its store. Under DDP only rank 0 gets the rows (the other
        ranks: ``FeatureBank.without_rows``)."""
        bank = extract_features(
            module,
            self.train.source,
            spec=self.eval_spec,
            settings=self.settings,
            device=self.device,
            env=self.env,
            out_dir=self.output_dir / f"bank-{name}",
            source={
                "module": name,
                "epoch": epoch,
                "manifest": self.train.manifest_hash,
                "manifest_path": self.train.manifest_path,
            },
            progress=self.progress and self.env.is_main,
        )
        return bank.as_feature_bank()

    def evaluate(self, extractor: nn.Module, *, knn_k: int, knn_temperature: float, seed: int) -> EvalResult:
        """k-NN (val against train features) and k-means NMI/ARI (val) of ``extractor``.

        Under DDP every rank embeds its share of both sets and the rows are gathered to rank 0, which
        alone evaluates (its k-means on its own GPU) and hands the result to every rank."""
        assert self.val is not None
        common: dict[str, Any] = dict(
            spec=self.eval_spec, settings=self.settings, device=self.device, env=self.env
        )
        train = extract_eval_features(extractor, self.train.source, **common)
        val = extract_eval_features(extractor, self.val.source, **common)
        return on_rank0(
            self.env,
            lambda: evaluate_features(train, val, k=knn_k, temperature=knn_temperature, seed=seed),
            group=self.wait_group,
            what="the evaluation",
        )

    def val_images(self, count: int) -> torch.Tensor:
        """The first ``count`` val images under the eval view, (count, 3, H, W) on the device."""
        assert self.val is not None
        loader = build_loader(
            self.val.source,
            self.eval_spec,
            count,
            backend="torch",
            num_workers=0,
            shuffle=False,
            device=self.device,
        )
        return next(iter(loader)).views[0].to(self.device)
