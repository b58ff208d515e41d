"""Checkpoints: written atomically, loadable with ``weights_only=True``, holding everything a resume needs.

A checkpoint is a plain dict of tensors and primitives: the method's state_dict (backbone, heads,
teacher, queues, centres), the optimizer and grad-scaler states, the run position (epoch, global step,
batches done in the epoch, plus the loader settings that position depends on), the torch RNG states and
the resolved config as YAML text.
"""

from __future__ import annotations

import os
import pickle
import re
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
    """torch.save to a temp file in the same directory, fsync, then rename over ``path``.

    A write that fails (full disk, quota, a vanished mount) removes the temp file, so it cannot keep the
    disk full, leaves any previous ``path`` untouched and raises one PipelineError naming the cause.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(dict(payload), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        # torch's zip writer reports a failed write as a RuntimeError; the OSError is in its chain
        tmp.unlink(missing_ok=True)
        raise PipelineError(f"cannot write {path}: {_write_failure(error)}") from None
    return path


def _write_failure(error: BaseException) -> str:
    """The operating system's reason for a failed write when there is one, else the error's first line."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    except pickle.UnpicklingError as error:
        raise PipelineError(_refused_pickle(path, error)) from None
    except Exception as error:
        raise PipelineError(f"cannot load checkpoint {path}: {str(error).splitlines()[0]}") from None
    if (
        not isinstance(payload, dict)
        or payload.get("version") != CHECKPOINT_VERSION
        or required_key not in payload
    ):
        raise PipelineError(f"{path} is not {what}")
    return payload


def _refused_pickle(path: Path, error: Exception) -> str:
    """What was refused and why. Not torch's advice to retry with ``weights_only=False``: for a file from
    elsewhere, running its pickled code is exactly the attack the refusal prevents."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if found is None:
        return f"refused to load {path}: it is not a plain checkpoint of tensors and settings"
    return (
        f"refused to load {path}: unpickling it would import {found.group(1)}, and a checkpoint holds only "
        "tensors and plain settings; a file that asks for Python objects is not a clusterssl checkpoint"
    )


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
    from clusterssl.config import parse_yaml
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
    if not isinstance(payload["config"], str):
        raise PipelineError(
            f"{path} is not a clusterssl checkpoint or backbone file (its config is not text)"
        )
    # the file may come from elsewhere: its config is checked like a config file, sizes included
    config = build_train_config(parse_yaml(payload["config"], f"the config in {path}"))
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
