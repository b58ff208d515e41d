"""Typed configuration: dataclasses loaded from YAML, overridable from the command line.

``load_config(path, overrides=["optim.lr=0.3", "trainer.epochs=1"])`` reads the YAML, applies the
overrides (values parsed as YAML, so ``0.3`` is a float and ``[0, 1]`` a list), and converts each section
into its dataclass, refusing unknown keys and wrong types with one line that names the key and the
choices. The method section is checked against the chosen method's own config class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from models.config import ConfigError, from_dict, to_dict
from pipeline.errors import PipelineError


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.3"`` → (["optim", "lr"], 0.3)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise PipelineError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (creating sections as needed); returns the same dict."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise PipelineError(f"--set {text}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else "invalid YAML"
        raise PipelineError(f"cannot parse {path}: {first_line}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.3}} → {"optim.lr": 0.3} (for MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


__all__ = [
    "ConfigError",
    "apply_overrides",
    "dump_yaml",
    "flatten",
    "from_dict",
    "parse_override",
    "read_yaml",
    "to_dict",
]
