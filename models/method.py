"""The Method contract: what the trainer calls, and what a method may ask of the run.

A method is an ``nn.Module`` holding its backbone, heads and buffers (queues, centres, teachers), so that
its ``state_dict`` is everything a checkpoint needs. The trainer drives it through ``forward(batch, ctx)``
and four hooks; everything a method needs from the run (the epoch, the step, the world size, an
extraction pass) reaches it through the ``TrainContext`` handed to ``forward`` and to every hook, never
through state a hook stashes for a later call. Every attribute of a method is set in its ``__init__``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from clusterssl.models.types import Batch, FeatureBank, LossOutput

T = TypeVar("T")


@dataclass
class MethodConfig:
    """Base of the methods' config dataclasses (``SwAVConfig``, …): a config section names its method.

    ``name`` is not a constructor argument: each subclass fixes it, so that a written config
    (``method: {name: swav, …}``) says which class reads it back.
    """

    name: str = field(default="", init=False)


class TrainContext(Protocol):
    """What the trainer tells a method about the run, at the call it is handed to.

    Implemented by ``clusterssl.pipeline.train.trainer.RunContext``; ``epoch`` and ``step`` are current
    whenever ``forward`` or a hook receives the context.
    """

    epoch: int
    """Current epoch, 0-based."""
    epochs: int
    """Total number of epochs of the run."""
    step: int
    """Global optimizer step, 0-based: the number of steps already taken before the current one."""
    steps_per_epoch: int
    rank: int
    world_size: int
    device: torch.device
    num_samples: int
    """N, the number of samples in the training set (global indices are 0..N-1)."""

    def extract(self, module: nn.Module, *, name: str) -> FeatureBank:
        """Run ``module`` in eval mode over every training sample once (``eval`` view) and return the
        (N, D) features, row i for global index i. Every rank must call it (each embeds its share), but
        under DDP only rank 0 receives the rows; the other ranks get ``FeatureBank.without_rows(N)``
        and must not read its features or labels (``cluster_on_rank_zero`` reads them on rank 0)."""
        ...

    def set_sample_repeats(self, repeats: np.ndarray | None) -> None:
        """How many times each sample (by global index) is drawn in the coming epoch; None = once each.
        Called from ``on_epoch_start`` (DeepCluster's uniform sampling over clusters)."""
        ...

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Record metrics at the current step (rank 0 writes them; other ranks ignore the call)."""
        ...

    def on_rank_zero(self, work: Callable[[], T], *, what: str) -> T:
        """Run ``work`` on rank 0 alone and hand its (picklable) result to every rank; the other ranks
        wait on a process group whose timeout is sized for such work (``trainer.wait_timeout_s``), and
        stop with one line naming ``what`` when rank 0 fails. ``work()`` itself in one process."""
        ...

    def reset_optimizer_state(self, parameters: Iterable[nn.Parameter]) -> None:
        """Forget the optimizer's state (momentum, Adam moments) of these parameters: for layers a method
        re-initialises in place, e.g. DeepCluster's classifier after every clustering."""
        ...


class Method(nn.Module):
    """Base class of the methods. Subclasses set ``name`` and ``config_class`` and implement
    ``forward``; the hooks default to doing nothing.

    ``forward`` and the hooks run once per step: they must not read tensors back to the host
    (``.item()``, ``bool(tensor)``, ``.cpu()``, …), which would make the CPU wait for the GPU every step.
    Decisions a step needs come from the context (epoch, step) or from tensor shapes; metrics stay on the
    device. ``on_train_start`` and ``on_epoch_start`` run once per epoch and may read freely.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]]

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @classmethod
    def supports(cls, backbone: nn.Module) -> bool:
        """Whether this method can train ``backbone``; every backbone by default (iBOT needs a ViT)."""
        return True

    def forward(self, batch: Batch, ctx: TrainContext) -> LossOutput:  # pragma: no cover - abstract
        """The step's loss and metrics (``scalar_metrics``: detached 0-dim tensors) for ``batch`` at the
        run position ``ctx`` gives (epoch, step)."""
        raise NotImplementedError

    def on_train_start(self, ctx: TrainContext) -> None:
        """Once, before the first step of the run (also after a resume)."""

    def on_epoch_start(self, ctx: TrainContext) -> None:
        """Before each epoch's loader is built: DeepCluster and PCL run extraction and clustering here."""

    def on_after_backward(self, ctx: TrainContext) -> None:
        """After the gradients are unscaled and clipped, before the optimizer step."""

    def on_step_end(self, ctx: TrainContext) -> None:
        """After the optimizer step: EMA teachers, queues, centres."""

    def frozen_parameters(self, ctx: TrainContext) -> Iterable[nn.Parameter]:
        """Parameters whose gradients the trainer drops at this step (after clipping, before the step):
        SwAV's prototypes for the first iterations, DINO's last layer during the first epoch."""
        return ()

    def replicated_buffers(self) -> tuple[str, ...]:
        """Names (as ``named_buffers`` gives them) of the buffers that are the same on every rank: filled
        on rank 0 and broadcast, or updated with every rank's rows. The checkpoint files of the ranks other
        than 0 leave them out; a resume restores them on every rank from rank 0's checkpoint. None by
        default."""
        return ()

    def feature_extractor(self) -> nn.Module:
        """The module evaluation embeds images with, mapping (batch, 3, H, W) to (batch, D) features.
        The student backbone by default; DINO uses the teacher's."""
        return self.backbone
