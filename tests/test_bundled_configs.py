"""Every bundled config (configs/*.yaml) loads, and the ImageNet recipes need only their training shards."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from pipeline.data import resolve_dataset
from pipeline.runner import load_pipeline_config
from pipeline.train_config import BUNDLED_CONFIGS, load_train_config

PLACEHOLDER = "/path/to/"
TRAIN_CONFIGS = sorted(p.name for p in BUNDLED_CONFIGS.glob("*.yaml") if not p.name.startswith("pipeline_"))
PIPELINE_CONFIGS = sorted(p.name for p in BUNDLED_CONFIGS.glob("pipeline_*.yaml"))
IMAGENET_CONFIGS = [name for name in TRAIN_CONFIGS if name.endswith("_imagenet.yaml")]


def string_leaves(value: Any, path: str = "") -> dict[str, str]:
    """Every string in a nested dict/list, by its dotted key."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in string_leaves(item, f"{path}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in string_leaves(item, f"{path}[{i}]").items()}
    return {path.lstrip("."): value} if isinstance(value, str) else {}


def test_the_config_lists_are_not_empty() -> None:
    assert len(TRAIN_CONFIGS) >= 10 and len(IMAGENET_CONFIGS) == 5 and PIPELINE_CONFIGS


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_training_config_loads(name: str) -> None:
    config = load_train_config(BUNDLED_CONFIGS / name)
    assert config.method_name and name.startswith(config.method_name)


@pytest.mark.parametrize("name", PIPELINE_CONFIGS)
def test_pipeline_config_loads(name: str) -> None:
    load_pipeline_config(BUNDLED_CONFIGS / name)


@pytest.mark.parametrize("name", IMAGENET_CONFIGS)
def test_imagenet_config_needs_only_data_train(name: str, digits16: Path) -> None:
    placeholders = {k for k, v in string_leaves(asdict(load_train_config(BUNDLED_CONFIGS / name))).items()
                    if PLACEHOLDER in v}  # fmt: skip
    assert placeholders == {"data.train"}
    config = load_train_config(BUNDLED_CONFIGS / name, [f"data.train={digits16 / 'train'}"])
    assert not [v for v in string_leaves(asdict(config)).values() if PLACEHOLDER in v]
    assert config.data.val is None  # no evaluation set to point anywhere until one is given
    assert resolve_dataset(config.data, split="train").num_samples == 1618
