"""Methods by name, built from plain dicts (the ``method`` and ``model`` sections of a config).

``build_method("swav", "resnet18_small", {"num_prototypes": 30}, {})`` gives a ready ``SwAV``; a misspelt
method, backbone or key fails with one ModelError line that lists what is known.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from models.backbones import create_backbone
from models.dino import DINO
from models.errors import ModelError
from models.method import Method
from models.registry import Registry
from models.swav import SwAV

METHODS: Registry[Method] = Registry("method", {"swav": SwAV, "dino": DINO})

C = TypeVar("C")


def build_method(
    name: str,
    backbone_name: str,
    method_kwargs: Mapping[str, Any] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> Method:
    """The method ``name`` on a fresh backbone ``backbone_name``; kwargs override the config defaults."""
    cfg = method_config_from_dict(name, method_kwargs or {})
    backbone = create_backbone(backbone_name, **dict(backbone_kwargs or {}))
    return METHODS[name](backbone, cfg)


def method_config_from_dict(name: str, values: Mapping[str, Any]) -> Any:
    """The config dataclass of method ``name`` with ``values`` applied (validates without building a model)."""
    return config_from_dict(METHODS[name].config_class, values, what=f"method config for {name}")


def config_from_dict(config_class: type[C], values: Mapping[str, Any], *, what: str) -> C:
    """Build the dataclass ``config_class`` from ``values`` (as loaded from YAML).

    Unknown keys and values of the wrong type raise one ModelError line naming ``what``. YAML lists become
    tuples where the field is a tuple; integers are accepted for float fields.
    """
    fields = {field.name: field for field in dataclasses.fields(config_class)}  # type: ignore[arg-type]
    for key in values:
        if key not in fields:
            raise ModelError(f"unknown key {key!r} in {what}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(config_class)
    converted = {key: _coerce(value, hints[key], key, what) for key, value in values.items()}
    return config_class(**converted)


def _coerce(value: Any, hint: Any, key: str, what: str) -> Any:
    def wrong(kind: str) -> ModelError:
        return ModelError(f"{what}: {key!r} must be {kind}, got {value!r}")

    if hint is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if typing.get_origin(hint) is tuple:
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise wrong("a list")
        return tuple(_coerce(item, item_hint, key, what) if item_hint is not Any else item for item in value)
    return value
