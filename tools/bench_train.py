"""``clusterssl bench train``: training images/s of each method beside the bare backbone, in one run.

What is timed is the method, not the data path: every step reuses one batch of synthetic multi-crop
views (standard normal tensors of the preset's sizes, already on the device), so no loader, decoding or
augmentation is involved.

1. **bare**: the backbone alone as a trivial method (forward of every view, grouped by resolution as the
   methods do, loss = mean of the squared features), through the trainer's own optimizer-step path
   (``pipeline.train.optim.OptimizerStep``), with the same optimizer, precision and tensors. Measured first
   and again last, so that drift on a shared machine shows.
2. **each method** (``models.factory.METHODS``: swav, dino, …) built on a fresh copy of the same
   backbone: forward (heads, loss, Sinkhorn or teacher, collapse metrics), the same step path, then
   ``on_step_end`` (EMA teacher, queue). The run context is a steady-state one (epoch 50 of 100): past
   warm-ups and freezes, so the figure is that of most of a run.

``overhead`` = bare images/s ÷ method images/s − 1: the fraction of extra time the method adds to the
backbone's forward+backward. Methods that cluster a feature store at the start of every epoch (DeepCluster,
PCL) do it once, untimed, on ``--bank-samples`` synthetic images; that per-epoch cost is what
``bench kmeans`` and the extraction pass measure.

    clusterssl bench train --backbone resnet50 --preset swav                  # 2×224 + 6×96, batch 64
    clusterssl bench train --backbone resnet18 --global-size 32 --local-size 16 --num-local 4 \\
        --set swav.num_prototypes=100 --threads 1 --json
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from clusterssl.config import apply_overrides, method_config
from clusterssl.errors import ModelError, PipelineError
from clusterssl.models.backbones import create_backbone, embed_views
from clusterssl.models.factory import METHODS, build_method
from clusterssl.models.method import Method, TrainContext
from clusterssl.models.types import Batch, FeatureBank, LossOutput
from clusterssl.pipeline.data.spec import MultiCropSpec
from clusterssl.pipeline.train.optim import OptimConfig, OptimizerStep, build_optimizer
from clusterssl.pipeline.train.precision import autocast, resolve_precision

T = TypeVar("T")
STEADY_EPOCH, STEADY_EPOCHS = 50, 100
"""The run position the methods are timed at: after every warm-up and freeze of the default recipes."""


class BareBackbone(Method):
    """The backbone and nothing else, as a method: loss = mean of the squared features of all views.

    Goes through the same step path as the real methods, so that the difference is the method's own work.
    """

    name: ClassVar[str] = "bare"

    def forward(self, batch: Batch, ctx: TrainContext) -> LossOutput:
        features = embed_views(self.backbone, batch.views)  # (views·batch, num_features)
        return LossOutput(loss=features.float().square().mean())


@dataclass
class BenchContext:
    """A ``models.method.TrainContext`` at a fixed steady-state position of a run with synthetic data.

    ``extract`` embeds ``images`` (N, 3, H, W) in eval mode, row i for sample i; the optimizer is
    attached once it exists, so that ``reset_optimizer_state`` works as in the trainer.
    """

    device: torch.device
    images: Tensor
    steps_per_epoch: int
    epoch: int = STEADY_EPOCH
    epochs: int = STEADY_EPOCHS
    step: int = 0
    rank: int = 0
    world_size: int = 1
    sample_repeats: np.ndarray | None = None
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.step = self.epoch * self.steps_per_epoch

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    @torch.no_grad()
    def extract(self, module: nn.Module, *, name: str) -> FeatureBank:
        was_training = module.training
        module.eval()
        try:
            features = torch.cat([module(chunk) for chunk in self.images.split(256)])
        finally:
            module.train(was_training)
        return FeatureBank(features=features.float().cpu().numpy())

    def set_sample_repeats(self, repeats: np.ndarray | None) -> None:
        self.sample_repeats = repeats

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Metrics are not recorded by a benchmark."""

    def on_rank_zero(self, work: Callable[[], T], *, what: str) -> T:
        """One process: rank 0's work is done here."""
        return work()

    def reset_optimizer_state(self, parameters: Iterable[nn.Parameter]) -> None:
        if self.optimizer is not None:
            for parameter in parameters:
                self.optimizer.state.pop(parameter, None)


def synthetic_batch(spec: MultiCropSpec, batch_size: int, device: torch.device, seed: int) -> Batch:
    """One batch of standard normal views with the spec's sizes: (batch, 3, s, s) per view, globals first;
    ``index`` is 0..batch−1 (no padding), no labels."""
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch_size, 3, size, size, generator=generator) for size in spec.sizes]
    index = torch.arange(batch_size, dtype=torch.int64)
    return Batch(views=views, labels=None, index=index, num_global=spec.num_global).to(device)


@dataclass(frozen=True)
class Timing:
    images_per_s: float
    seconds_per_step: float
    steps: int
    last_loss: float


def time_training(
    method: Method,
    batch: Batch,
    *,
    optimizer_name: str,
    precision: str,
    steps: int,
    warmup: int,
    bank_images: Tensor,
    label: str = "",
    progress: bool = False,
) -> Timing:
    """Train ``method`` on ``batch`` for ``warmup`` untimed then ``steps`` timed steps, the trainer's way:
    forward under autocast → OptimizerStep (backward, clip, frozen grads, step) → on_step_end."""
    device = batch.views[0].device
    method.to(device).train()
    ctx = BenchContext(device=device, images=bank_images, steps_per_epoch=max(1, warmup + steps))
    optimizer = build_optimizer(OptimConfig(name=optimizer_name, lr=1e-3), method)
    ctx.optimizer = optimizer
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    step_fn = OptimizerStep(optimizer, scaler=scaler)
    method.on_train_start(ctx)
    method.on_epoch_start(ctx)  # DeepCluster/PCL: the extraction pass and clustering, untimed

    def one_step() -> Tensor:
        with autocast(device, precision):
            output = method(batch, ctx)
        step_fn(output.loss, method, ctx)
        method.on_step_end(ctx)
        ctx.step += 1
        return output.loss.detach()

    from tqdm import tqdm

    bar = tqdm(total=warmup + steps, desc=label, unit="step", disable=not progress, leave=False)
    for _ in range(warmup):
        one_step()
        bar.update()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
        bar.update()
    last_loss = float(loss)  # reads the value back: the device has finished the last step
    _synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    return Timing(
        images_per_s=batch.size * steps / seconds,
        seconds_per_step=seconds / steps,
        steps=steps,
        last_loss=last_loss,
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def method_settings_from_overrides(
    methods: Sequence[str], overrides: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """``["swav.num_prototypes=100"]`` → ``{"swav": {"num_prototypes": 100}, "dino": {}}`` for the
    benchmarked ``methods``. A key may name any registered method (settings of one not benchmarked in
    this run are ignored, so one command line serves several runs); other names are refused."""
    settings: dict[str, Any] = apply_overrides({name: {} for name in METHODS}, overrides)
    unknown = sorted(set(settings) - set(METHODS))
    if unknown:
        raise PipelineError(
            f"--set {unknown[0]}.…: not a method; known: {', '.join(METHODS)} (keys are METHOD.KEY=VALUE)"
        )
    return {name: settings.get(name, {}) for name in methods}


def run_benchmark(
    *,
    methods: Sequence[str],
    backbone: str,
    backbone_kwargs: Mapping[str, Any],
    spec: MultiCropSpec,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    precision: str,
    optimizer: str,
    method_overrides: Sequence[str] = (),
    bank_samples: int = 1024,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Images/s of the bare backbone (before and after) and of each method, with the same tensors.

    methods: names from ``models.factory.METHODS``; empty for every method that supports the backbone.
    """
    precision = resolve_precision(precision, device)
    probe = create_backbone(backbone, **dict(backbone_kwargs))
    # No methods named: every registered one that can train this backbone (iBOT only ViTs).
    methods = list(methods) or [name for name, method in METHODS.items() if method.supports(probe)]
    settings = method_settings_from_overrides(methods, method_overrides)
    for name in methods:  # a bad method, key or backbone option fails before anything is timed
        method_config({**settings[name], "name": name})
        if not METHODS[name].supports(probe):
            raise ModelError(f"method {name!r} cannot train backbone {backbone!r} (it needs a ViT)")
    batch = synthetic_batch(spec, batch_size, device, seed)
    bank_generator = torch.Generator().manual_seed(seed + 1)
    eval_size = spec.global_views[0].size
    bank_images = torch.randn(bank_samples, 3, eval_size, eval_size, generator=bank_generator).to(device)
    timing_options: dict[str, Any] = dict(
        optimizer_name=optimizer,
        precision=precision,
        steps=steps,
        warmup=warmup,
        bank_images=bank_images,
        progress=progress,
    )

    def bare() -> Timing:
        torch.manual_seed(seed)
        return time_training(
            BareBackbone(create_backbone(backbone, **dict(backbone_kwargs))),
            batch,
            label=f"bare {backbone}",
            **timing_options,
        )

    summary: dict[str, Any] = {
        "backbone": backbone,
        "backbone_kwargs": dict(backbone_kwargs),
        "views": spec.describe(),
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "device": str(device),
        "precision": precision,
        "optimizer": optimizer,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": os.getloadavg()[0],
        "method_settings": settings,
    }
    first = bare()
    results: dict[str, dict[str, float]] = {}
    for name in methods:
        torch.manual_seed(seed)
        try:
            timing = time_training(
                build_method(name, backbone, settings[name], backbone_kwargs),
                batch,
                label=name,
                **timing_options,
            )
        except ModelError as error:  # e.g. DeepCluster's k = 10,000 against the 1,024-image synthetic bank
            raise PipelineError(
                f"{name}: {error} (the benchmark's bank holds --bank-samples {bank_samples} synthetic images: "
                f"raise --bank-samples or lower the method's k with --set {name}.KEY=VALUE)"
            ) from None
        results[name] = {
            "images_per_s": timing.images_per_s,
            "seconds_per_step": timing.seconds_per_step,
            "last_loss": timing.last_loss,
        }
    last = bare()
    bare_rate = (first.images_per_s + last.images_per_s) / 2
    for result in results.values():
        result["overhead"] = bare_rate / result["images_per_s"] - 1.0
    summary.update(
        bare_images_per_s=bare_rate,
        bare_images_per_s_first=first.images_per_s,
        bare_images_per_s_last=last.images_per_s,
        methods=results,
        load_average_after=os.getloadavg()[0],
    )
    return summary


def render(summary: Mapping[str, Any]) -> str:
    lines = [
        f"training step on synthetic views: {summary['backbone']}, {summary['views']}, batch "
        f"{summary['batch_size']}, {summary['precision']}, {summary['optimizer']}, device {summary['device']} "
        f"({summary['threads']} threads), {summary['steps']} steps after {summary['warmup']}",
        f"  bare forward+backward  {summary['bare_images_per_s']:>9.1f} images/s   (first "
        f"{summary['bare_images_per_s_first']:.1f}, last {summary['bare_images_per_s_last']:.1f})",
    ]
    for name, result in summary["methods"].items():
        lines.append(
            f"  {name:<22} {result['images_per_s']:>9.1f} images/s   overhead "
            f"{100 * result['overhead']:+.1f}% over bare"
        )
    lines.append(
        f"  1-min load average {summary['load_average_before']:.1f} before, "
        f"{summary['load_average_after']:.1f} after, on {summary['cpu_count']} CPUs"
    )
    return "\n".join(lines)
