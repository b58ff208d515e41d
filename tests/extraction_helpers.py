"""A tiny feature extractor and extraction settings shared by the extraction tests."""

from __future__ import annotations

from pathlib import Path

import torch
from fakes import TinyBackbone
from torch import Tensor, nn

from clusterssl.pipeline.data.spec import MultiCropSpec
from clusterssl.pipeline.features.extraction import ExtractionSettings, extract_features
from clusterssl.pipeline.features.store import FeatureStore

EVAL_SPEC = MultiCropSpec.preset("eval", global_size=16)
"""The eval view of the 16-px digits."""


def tiny_module(seed: int = 0) -> nn.Module:
    """(batch, 3, H, W) → (batch, 8): the same weights for the same seed, in any process."""
    torch.manual_seed(seed)
    return TinyBackbone(num_features=8)


class CountingModule(nn.Module):
    """Wraps a module and counts the images it embeds (to see what a resumed pass reads)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, images: Tensor) -> Tensor:
        self.images += images.shape[0]
        return self.inner(images)


def run_extraction(
    data: Path | str, module: nn.Module, *, batch_size: int = 100, num_workers: int = 2, **options: object
) -> FeatureStore:
    """``extract_features`` with the 16-px eval view, batches of 100, the torch backend, no progress bar;
    ``options`` are further arguments of ``extract_features``."""
    settings = ExtractionSettings(batch_size=batch_size, backend="torch", num_workers=num_workers)
    return extract_features(module, data, spec=EVAL_SPEC, settings=settings, progress=False, **options)  # type: ignore[arg-type]
