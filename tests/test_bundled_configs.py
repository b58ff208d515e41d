"""Every bundled config (configs/*.yaml) loads, and the ImageNet recipes need only their training shards."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from clusterssl.config import bundled_config, bundled_config_names
from clusterssl.pipeline.data.datasets import resolve_dataset
from clusterssl.pipeline.runner import load_pipeline_config
from clusterssl.pipeline.train.train_config import load_train_config

PLACEHOLDER = "/path/to/"
TRAIN_CONFIGS = [name for name in bundled_config_names() if not name.startswith("pipeline_")]
PIPELINE_CONFIGS = [name for name in bundled_config_names() if name.startswith("pipeline_")]
IMAGENET_CONFIGS = [name for name in TRAIN_CONFIGS if name.endswith("_imagenet")]


def string_leaves(value: Any, path: str = "") -> dict[str, str]:
    """Every string in a nested dict/list, by its dotted key."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in string_leaves(item, f"{path}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in string_leaves(item, f"{path}[{i}]").items()}
    return {path.lstrip("."): value} if isinstance(value, str) else {}


def test_the_config_lists_are_not_empty() -> None:
    assert len(TRAIN_CONFIGS) >= 10 and len(IMAGENET_CONFIGS) == 6 and PIPELINE_CONFIGS


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_training_config_loads(name: str) -> None:
    config = load_train_config(bundled_config(name))
    assert config.method_name and name.startswith(config.method_name)


@pytest.mark.parametrize("name", PIPELINE_CONFIGS)
def test_pipeline_config_loads(name: str) -> None:
    load_pipeline_config(bundled_config(name))


@pytest.mark.parametrize("name", IMAGENET_CONFIGS)
def test_imagenet_config_needs_only_data_train(name: str, digits16: Path) -> None:
    placeholders = {k for k, v in string_leaves(asdict(load_train_config(bundled_config(name)))).items()
                    if PLACEHOLDER in v}  # fmt: skip
    assert placeholders == {"data.train"}
    config = load_train_config(bundled_config(name), [f"data.train={digits16 / 'train'}"])
    assert not [v for v in string_leaves(asdict(config)).values() if PLACEHOLDER in v]
    assert config.data.val is None  # no evaluation set to point anywhere until one is given
    assert resolve_dataset(config.data, split="train").num_samples == 1618
