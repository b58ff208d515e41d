"""Methods by name: ``build_method`` gives a ready method on a fresh backbone.

``build_method("swav", "resnet18_small", {"num_prototypes": 30})`` or
``build_method("swav", "resnet18_small", SwAVConfig(num_prototypes=30))``. A misspelt method or backbone
fails with one ModelError line that lists what is known. Type checking of settings read from files is
``clusterssl.config``'s job; here a mapping goes straight to the config dataclass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from clusterssl.config import from_dict
from clusterssl.errors import ModelError
from clusterssl.models.backbones import create_backbone
from clusterssl.models.deepcluster import DeepCluster
from clusterssl.models.deepcluster_v2 import DeepClusterV2
from clusterssl.models.dino import DINO
from clusterssl.models.ibot import IBOT
from clusterssl.models.method import Method, MethodConfig
from clusterssl.models.pcl import PCL
from clusterssl.models.registry import Registry
from clusterssl.models.swav import SwAV

METHODS: Registry[Method] = Registry(
    "method",
    {
        "swav": SwAV,
        "dino": DINO,
        "ibot": IBOT,
        "deepcluster": DeepCluster,
        "deepcluster_v2": DeepClusterV2,
        "pcl": PCL,
    },
)


def build_method(
    name: str,
    backbone_name: str,
    settings: MethodConfig | Mapping[str, Any] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> Method:
    """The method ``name`` on a fresh backbone ``backbone_name``.

    settings: the method's config dataclass, or a mapping of its fields (defaults fill the rest).
    """
    method_class = METHODS[name]
    config = settings if isinstance(settings, MethodConfig) else _config_from_mapping(method_class, settings)
    if not isinstance(config, method_class.config_class):
        raise ModelError(f"method {name!r} takes a {method_class.config_class.__name__}, got {config!r}")
    backbone = create_backbone(backbone_name, **dict(backbone_kwargs or {}))
    return method_class(backbone, config)


def _config_from_mapping(method_class: type[Method], settings: Mapping[str, Any] | None) -> MethodConfig:
    values = {key: value for key, value in (settings or {}).items() if key != "name"}
    return from_dict(method_class.config_class, values, prefix="method")
