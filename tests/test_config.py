"""Typed config loading: overrides, type checks and the one-line errors for unknown keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clusterssl.config import (
    ConfigError,
    apply_overrides,
    flatten,
    from_dict,
    parse_override,
    read_yaml,
    to_dict,
)
from clusterssl.errors import PipelineError


@dataclass
class Inner:
    lr: float = 0.1
    scale: tuple[float, float] = (0.1, 1.0)
    name: str = "sgd"
    limit: int | None = None


@dataclass
class Outer:
    optim: Inner = field(default_factory=Inner)
    epochs: int = 3
    tags: list[str] = field(default_factory=list)


def test_overrides_parse_values_as_yaml() -> None:
    assert parse_override("optim.lr=0.3") == (["optim", "lr"], 0.3)
    assert parse_override("trainer.epochs=1") == (["trainer", "epochs"], 1)
    assert parse_override("a.b=[0.2, 1]") == (["a", "b"], [0.2, 1])
    assert parse_override("a=") == (["a"], None)
    with pytest.raises(PipelineError, match="key=value"):
        parse_override("novalue")


def test_from_dict_builds_nested_dataclasses_with_overrides() -> None:
    data = apply_overrides({"optim": {"lr": 1}}, ["optim.scale=[0.2, 0.9]", "epochs=5", "optim.limit=7"])
    config = from_dict(Outer, data)
    assert config == Outer(optim=Inner(lr=1.0, scale=(0.2, 0.9), limit=7), epochs=5)
    assert isinstance(config.optim.lr, float)
    assert flatten(to_dict(config)) == {
        "optim.lr": 1.0,
        "optim.scale": [0.2, 0.9],
        "optim.name": "sgd",
        "optim.limit": 7,
        "epochs": 5,
        "tags": [],
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"optim": {"lrr": 1}}, "unknown config key 'optim.lrr'; known in optim: lr, scale, name, limit"),
        ({"epoch": 1}, "unknown config key 'epoch'"),
        ({"epochs": "three"}, "config key 'epochs' must be int, got 'three'"),
        ({"epochs": 1.5}, "config key 'epochs' must be int"),
        ({"optim": {"scale": [1]}}, "config key 'optim.scale' must have 2 items"),
        ({"optim": 3}, "config key 'optim' must be a section"),
        ({"optim": {"limit": "x"}}, "config key 'optim.limit' must be int"),
    ],
)
def test_bad_configs_fail_with_one_line(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        from_dict(Outer, data)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_read_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(PipelineError, match="cannot parse"):
        read_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(PipelineError, match="mapping of sections"):
        read_yaml(tmp_path / "list.yaml")
