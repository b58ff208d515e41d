"""Configuration: the one place that loads, validates and writes it.

Every configuration the project reads (a training config, a pipeline config, the config embedded in a
checkpoint) is a tree of typed dataclasses. ``from_dict`` turns a plain mapping (as loaded from YAML) into
one, refusing unknown keys and values of the wrong type with one line that names the dotted key and what
is known; ``apply_overrides`` applies ``--set optim.lr=0.3`` style overrides (values parsed as YAML, so
``0.3`` is a float and ``[0, 1]`` a list) before that; ``method_config`` checks a method section against the
chosen method's own config class. Bundled configs (``swav_digits``, …) ship inside the package and are found
with ``importlib.resources``.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from clusterssl.errors import ConfigError, ModelError, PipelineError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) ``value`` against the annotation ``tp``; ``key`` names it in errors."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key {key!r} must have {len(args)} items, got {len(value)}")
            return tuple(
                _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(tp, type) and tp not in (int, float, bool, str) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key {key!r} must be {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and values of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    known = ", ".join(fields)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}; known in {prefix or 'the config'}: {known}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad config section {prefix or cls.__name__}: {error}") from None


def to_dict(config: Any) -> Any:
    """A dataclass (recursively) as plain YAML-able values: tuples become lists."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, Mapping):
        return {str(k): to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


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
    return parse_yaml(path.read_text(encoding="utf-8"), str(path))


def parse_yaml(text: str, origin: str) -> dict[str, Any]:
    """The mapping of sections in ``text`` (safe YAML: tags that build Python objects are refused);
    ``origin`` names where it came from in the one-line error (a path, "the config in checkpoint.pt")."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else "invalid YAML"
        raise PipelineError(f"cannot parse {origin}: {first_line}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{origin} must hold a mapping of sections, got {type(data).__name__}")
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


def method_config(values: Mapping[str, Any], prefix: str = "method") -> Any:
    """A method section (``name`` plus that method's settings) as the method's own config dataclass."""
    from clusterssl.models.factory import METHODS  # the method modules import torch: only when asked

    settings = dict(values)
    name = settings.pop("name", None)
    if not name:
        raise ConfigError(f"the {prefix} section needs a name; known: {', '.join(METHODS)}")
    try:
        return from_dict(METHODS[str(name)].config_class, settings, prefix=prefix)
    except ModelError as error:  # an unknown method name
        raise ConfigError(str(error)) from None


def bundled_config(name: str) -> Path | None:
    """The config shipped with the package under ``name`` (``swav_digits`` or ``swav_digits.yaml``), or
    None. ``$CLUSTERSSL_CONFIG_DIR``, when set, is searched first (a directory of the user's own configs)."""
    filename = name if name.endswith(".yaml") else f"{name}.yaml"
    if "/" in filename or filename.startswith("."):
        return None
    override = os.environ.get("CLUSTERSSL_CONFIG_DIR")
    if override and (Path(override) / filename).is_file():
        return Path(override) / filename
    packaged = resources.files("clusterssl.configs") / filename
    return Path(str(packaged)) if packaged.is_file() else None


def bundled_config_names() -> list[str]:
    """Names of the configs shipped with the package (without ``.yaml``)."""
    return sorted(
        entry.name[: -len(".yaml")]
        for entry in resources.files("clusterssl.configs").iterdir()
        if entry.name.endswith(".yaml")
    )


def resolve_config_path(value: str | Path) -> Path:
    """A path as given when it exists, else a bundled config by name (``swav_digits``)."""
    path = Path(value)
    if path.exists():
        return path
    return bundled_config(str(value)) or path
