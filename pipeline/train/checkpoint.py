"""Checkpoints: written atomically, loadable with ``weights_only=True``, holding everything a resume needs.

A checkpoint is a plain dict of tensors and primitives: the method's state_dict (backbone, heads,
teacher, queues, centres), the optimizer and grad-scaler states, the run position (epoch, global step,
batches done in the epoch, plus the loader settings that position depends on), the torch RNG states and
the resolved config as YAML text.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from clusterssl.errors import PipelineError

CHECKPOINT_VERSION = 1
LAST_NAME = "checkpoint.pt"


@dataclass
class RunPosition:
    """Where a run stands: ``epoch`` in progress, ``step`` optimizer steps taken, ``batch_in_epoch`` done."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    world_size: int = 1
    num_workers: int = 0
    """The loader layout the position refers to; a resume with another layout restarts the epoch."""


def atomic_save(payload: Mapping[str, Any], path: str | Path) -> Path:
    """torch.save to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        torch.save(dict(payload), handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def rng_state() -> dict[str, Any]:
    """The CPU generator and the generator of this process's own GPU (the current device: each rank's,
    once the process group has set it). Not every visible GPU's: a resume on a machine with fewer GPUs,
    or under Slurm's one-GPU-per-task ``CUDA_VISIBLE_DEVICES``, must find a state for its device."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif state.get("cuda"):
        # older checkpoints: one state per GPU the saving process saw; take this device's when the saver
        # had it, else the first (the saving rank's own GPU in the usual one-GPU-per-rank layout)
        saved = state["cuda"]
        torch.cuda.set_rng_state(saved[device] if device < len(saved) else saved[0], device)


def make_checkpoint(
    *,
    method_state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any],
    scaler_state: Mapping[str, Any] | None,
    position: RunPosition,
    config_yaml: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "version": CHECKPOINT_VERSION,
        "method": dict(method_state),
        "optimizer": dict(optimizer_state),
        "scaler": dict(scaler_state) if scaler_state else None,
        "position": asdict(position),
        "rng": rng_state(),
        "config": config_yaml,
        "extra": dict(extra or {}),
    }


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; a missing or unreadable file is one clear PipelineError."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST_NAME
    if not path.is_file():
        raise PipelineError(f"checkpoint not found: {path}")
    return _load_payload(
        path, "method", map_location, f"a clusterssl checkpoint (version {CHECKPOINT_VERSION})"
    )


def _load_payload(
    path: Path, required_key: str, map_location: str | torch.device, what: str
) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of one of our files; anything else is one clear PipelineError."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise PipelineError(f"cannot load checkpoint {path}: {str(error).splitlines()[0]}") from None
    if (
        not isinstance(payload, dict)
        or payload.get("version") != CHECKPOINT_VERSION
        or required_key not in payload
    ):
        raise PipelineError(f"{path} is not {what}")
    return payload


def position_of(checkpoint: Mapping[str, Any]) -> RunPosition:
    return RunPosition(**checkpoint["position"])


BACKBONE_NAME = "backbone.pt"


def save_backbone(module: torch.nn.Module, config_yaml: str, path: str | Path) -> Path:
    """The final weights of the feature extractor, with the run config that rebuilds its architecture."""
    return atomic_save(
        {
            "version": CHECKPOINT_VERSION,
            "kind": "backbone",
            "config": config_yaml,
            "state_dict": module.state_dict(),
        },
        path,
    )


def load_feature_extractor(location: str | Path, *, random_init: bool = False) -> tuple[torch.nn.Module, Any]:
    """The feature extractor of a run and its TrainConfig, from a checkpoint.pt, a backbone.pt or a run
    directory holding either. ``random_init=True`` returns the same architecture freshly initialised
    (seeded from the config): the floor every method must beat."""
    import yaml

    from clusterssl.models.backbones import create_backbone
    from clusterssl.models.factory import build_method
    from clusterssl.pipeline.train.train_config import build_train_config

    path = Path(location)
    if path.is_dir():
        path = path / LAST_NAME if (path / LAST_NAME).exists() else path / BACKBONE_NAME
    if not path.is_file():
        raise PipelineError(
            f"checkpoint not found: {location} (expected a checkpoint.pt, a backbone.pt or a run directory)"
        )
    payload = _load_payload(path, "config", "cpu", "a clusterssl checkpoint or backbone file")
    config = build_train_config(yaml.safe_load(payload["config"]))
    torch.manual_seed(config.trainer.seed)
    if payload.get("kind") == "backbone":
        module = create_backbone(config.model.backbone, **config.model.backbone_kwargs)
        if not random_init:
            module.load_state_dict(payload["state_dict"])
        return module, config
    method = build_method(
        config.method_name, config.model.backbone, config.method, config.model.backbone_kwargs
    )
    if not random_init:
        method.load_state_dict(payload["method"])
    return method.feature_extractor(), config
