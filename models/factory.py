"""Methods by name, built from plain dicts (the ``method`` and ``model`` sections of a config).

``build_method("swav", "resnet18_small", {"num_prototypes": 30}, {})`` gives a ready ``SwAV``; a misspelt
method, backbone or key fails with one ModelError line that lists what is known.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.backbones import create_backbone
from models.config import from_dict
from models.deepcluster import DeepCluster
from models.deepcluster_v2 import DeepClusterV2
from models.dino import DINO
from models.method import Method
from models.pcl import PCL
from models.registry import Registry
from models.swav import SwAV

METHODS: Registry[Method] = Registry(
    "method",
    {"swav": SwAV, "dino": DINO, "deepcluster": DeepCluster, "deepcluster_v2": DeepClusterV2, "pcl": PCL},
)


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
    return from_dict(METHODS[name].config_class, values, prefix="method")
