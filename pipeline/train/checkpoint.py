"""Checkpoints: written atomically, loadable with ``weights_only=True``, holding everything a resume needs.

A checkpoint is a plain dict of tensors and primitives: the method's state_dict (backbone, heads,
teacher, queues, centres), the optimizer and grad-scaler states, the run position (epoch, global step,
batches done in the epoch, plus the loader settings that position depends on), the torch RNG states and
the resolved config as YAML text. ``RunCheckpoints`` is how the trainer writes and reads them in a run
directory, one file per rank under DDP.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from clusterssl.errors import PipelineError
from clusterssl.models.method import Method
from clusterssl.pipeline.train.world import DistributedEnv, same_on_all_ranks

log = logging.getLogger(__name__)

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


class RunCheckpoints:
    """The checkpoint files of one run directory, as the trainer writes and reads them.

    Rank 0 writes ``checkpoint.pt``; under DDP every other rank keeps its own buffers beside it in
    ``checkpoint.rank{r}.pt`` (its queue differs from rank 0's), so that a resume on the same world size
    restores each rank exactly. Buffers the method declares the same on every rank
    (``Method.replicated_buffers``, e.g. DeepCluster-v2's memory bank) are left out of those files: every
    rank loads ``checkpoint.pt`` on resume and takes them from there, that is from rank 0.
    """

    def __init__(self, output_dir: Path, env: DistributedEnv, device: torch.device) -> None:
        self.output_dir = output_dir
        self.env = env
        self.device = device
        self.path = output_dir / LAST_NAME

    def rank_state_path(self) -> Path:
        """Where rank r > 0 keeps its own buffers (SwAV's queue, BatchNorm statistics) between runs."""
        return self.output_dir / f"checkpoint.rank{self.env.rank}.pt"

    def load_for_resume(self, resume: bool) -> dict[str, Any] | None:
        """The checkpoint to continue (``resume``) or None; refuses to start over an existing one."""
        found = self.path.exists()
        checkpoint = load_checkpoint(self.path) if resume and found else None
        self._check_ranks_see_the_same(found, checkpoint)
        if resume:
            if checkpoint is None:
                log.warning("--resume: no checkpoint in %s yet, starting from scratch", self.output_dir)
            return checkpoint
        if found:
            raise PipelineError(
                f"{self.output_dir} already holds a checkpoint; continue it with --resume or choose another "
                "--set trainer.output_dir=…"
            )
        return None

    def _check_ranks_see_the_same(self, found: bool, checkpoint: dict[str, Any] | None) -> None:
        """Every rank reads checkpoint.pt itself: under torchrun across nodes, a rank that does not see
        it (output_dir on node-local storage) would start from scratch while the others resume."""
        position = position_of(checkpoint) if checkpoint is not None else None
        seen = [int(found), *((position.epoch, position.step) if position else (-1, -1))]
        if same_on_all_ranks(self.env, seen, self.device):
            return
        mine = f"epoch {position.epoch}, step {position.step}" if position else ("found" if found else "none")
        raise PipelineError(
            f"the ranks do not see the same checkpoint in {self.output_dir} (rank {self.env.rank}: {mine}); "
            "trainer.output_dir must be on storage all nodes share"
        )

    def restore(
        self,
        checkpoint: Mapping[str, Any],
        *,
        method: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        num_workers: int,
    ) -> RunPosition:
        """Load the states and RNG of ``checkpoint``; returns the position to continue from, at the
        start of its epoch when the loader layout (ranks × workers) changed since it was written."""
        method.load_state_dict(checkpoint["method"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"])
        saved = position_of(checkpoint)
        same_layout = (saved.world_size, saved.num_workers) == (self.env.world_size, num_workers)
        if saved.batch_in_epoch and not same_layout:
            log.warning(
                "the checkpoint was taken mid-epoch with %d rank(s) × %d worker(s); with a different layout "
                "the epoch restarts from its first batch",
                saved.world_size,
                saved.num_workers,
            )
            saved.step -= saved.batch_in_epoch
            saved.batch_in_epoch = 0
        rank_path = self.rank_state_path()
        if self.env.rank > 0 and saved.world_size == self.env.world_size and rank_path.exists():
            buffers = load_checkpoint(rank_path)["method"]
            method.load_state_dict({**method.state_dict(), **buffers})
        saved.world_size, saved.num_workers = self.env.world_size, num_workers
        return saved

    def save(
        self,
        *,
        method: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        position: RunPosition,
        config_yaml: str,
        extra: Mapping[str, Any],
    ) -> None:
        """Rank 0 writes the checkpoint; every other rank writes its own buffers only (``rank_own_buffers``)."""
        if not self.env.is_main:
            buffers = rank_own_buffers(method)
            payload = make_checkpoint(
                method_state=buffers, optimizer_state={}, scaler_state=None, position=position, config_yaml=""
            )
            atomic_save(payload, self.rank_state_path())
            return
        payload = make_checkpoint(
            method_state=method.state_dict(),
            optimizer_state=optimizer.state_dict(),
            scaler_state=scaler.state_dict() if scaler else None,
            position=position,
            config_yaml=config_yaml,
            extra=extra,
        )
        atomic_save(payload, self.path)


def rank_own_buffers(method: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a rank other than 0 checkpoints itself: all but those the same on every rank."""
    replicated = set(method.replicated_buffers()) if isinstance(method, Method) else set()
    return {name: buffer for name, buffer in method.named_buffers() if name not in replicated}
