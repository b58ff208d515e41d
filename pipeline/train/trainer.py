"""The training loop: one for every method, readable top to bottom.

    config → data, views, method, optimizer, schedules → (resume) → for each epoch:
        method.on_epoch_start(ctx)            # DeepCluster/PCL: extraction pass + clustering
        for batch in loader:                  # exact epoch, same batch count on every rank
            loss = method(batch, ctx)         # under autocast
            step(loss)                        # scale, backward, unscale, clip, drop frozen grads, step
            method.on_step_end(ctx)           # EMA teacher, queues, centres
            every log_every steps: read the window, check the loss, log
        checkpoint, evaluate
    → final evaluation, backbone weights, plots, MLflow artifacts

Everything a resume needs is in the checkpoint, and every source of randomness in a step is a function
of (seed, epoch, sample index, step), so an interrupted and resumed CPU run reproduces the losses of an
uninterrupted one.

A step never reads a tensor back to the host: losses, metrics and gradient norms stay on the device in
a ``MetricWindow`` and are read with one copy at each log point, where a non-finite loss is caught. A run
whose loss turns NaN therefore stops at most ``trainer.log_every`` steps later (and before any
checkpoint is written), naming the first bad step. Checkpoint files are ``RunCheckpoints``' business,
pictures ``tracking.plots``'.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from clusterssl.config import dump_yaml, flatten, to_dict
from clusterssl.errors import PipelineError
from clusterssl.models.factory import build_method
from clusterssl.models.method import Method
from clusterssl.models.types import Batch, FeatureBank
from clusterssl.pipeline.data.datasets import Dataset, resolve_dataset, shard_set_name
from clusterssl.pipeline.data.loader import build_loader
from clusterssl.pipeline.data.spec import MultiCropSpec
from clusterssl.pipeline.features.evaluation import EvalResult
from clusterssl.pipeline.features.passes import RunPasses
from clusterssl.pipeline.tracking.plots import plot_loss_curve, plot_model_attention
from clusterssl.pipeline.tracking.runs import Tracker, git_commit, open_tracker, tracking_run
from clusterssl.pipeline.train.checkpoint import (
    BACKBONE_NAME,
    RunCheckpoints,
    RunPosition,
    load_feature_extractor,
    save_backbone,
)
from clusterssl.pipeline.train.cuda_runtime import configure_cuda, to_device_layout
from clusterssl.pipeline.train.lock import lock_directory
from clusterssl.pipeline.train.metric_window import MetricWindow
from clusterssl.pipeline.train.metrics_log import RunRecords
from clusterssl.pipeline.train.optim import OptimizerStep, build_optimizer, build_schedules
from clusterssl.pipeline.train.precision import autocast, resolve_precision
from clusterssl.pipeline.train.progress import EpochProgress, wants_progress
from clusterssl.pipeline.train.train_config import TrainConfig
from clusterssl.pipeline.train.world import (
    DistributedEnv,
    barrier,
    init_distributed,
    on_rank0,
    resolve_device,
    waiting_group,
    wrap_distributed,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


@dataclass
class RunContext:
    """The ``models.method.TrainContext`` the trainer hands to a method's forward and hooks; the trainer
    sets ``epoch`` and ``step`` before each call."""

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    rank: int
    world_size: int
    device: torch.device
    num_samples: int
    trainer: Trainer = field(repr=False)
    sample_repeats: np.ndarray | None = None

    @classmethod
    def of(cls, trainer: Trainer) -> RunContext:
        """The context of ``trainer``'s run at its current position."""
        return cls(
            epoch=trainer.position.epoch,
            epochs=trainer.config.trainer.epochs,
            step=trainer.position.step,
            steps_per_epoch=trainer.steps_per_epoch,
            rank=trainer.env.rank,
            world_size=trainer.env.world_size,
            device=trainer.device,
            num_samples=trainer.data.num_samples,
            trainer=trainer,
        )

    def extract(self, module: nn.Module, *, name: str) -> FeatureBank:
        return self.trainer.extract(module, name=name)

    def set_sample_repeats(self, repeats: np.ndarray | None) -> None:
        if repeats is not None and repeats.shape != (self.num_samples,):
            raise PipelineError(f"sample repeats must have shape ({self.num_samples},), got {repeats.shape}")
        self.sample_repeats = repeats

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self.trainer.log_metrics(metrics, step=self.step)

    def on_rank_zero(self, work: Callable[[], T], *, what: str) -> T:
        return on_rank0(self.trainer.env, work, group=self.trainer.wait_group, what=what)

    def reset_optimizer_state(self, parameters: Iterable[nn.Parameter]) -> None:
        state = self.trainer.optimizer.state
        for parameter in parameters:
            state.pop(parameter, None)


@dataclass
class TrainSummary:
    run_id: str | None
    checkpoint: str
    output_dir: str
    backbone: str | None
    epochs_done: int
    steps: int
    seconds: float
    images_per_s: float
    last_loss: float | None
    interrupted: bool = False
    tracking_uri: str | None = None
    """The MLflow store the run went to (None: not tracked)."""
    experiment_id: str | None = None
    model_id: str | None = None
    """The MLflow model logged from the trained backbone (None: not tracked)."""
    tracking_error: str | None = None
    """Why tracking stopped before the run ended (None: the MLflow record is complete)."""
    eval: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        trainer: Trainer,
        start_time: float,
        images_seen: int,
        eval_result: EvalResult | None,
        *,
        interrupted: bool = False,
        backbone: str | None = None,
    ) -> TrainSummary:
        """The summary of ``trainer``'s run, started at ``start_time`` (``time.perf_counter``)."""
        seconds = time.perf_counter() - start_time
        tracker = trainer.tracker
        return cls(
            run_id=tracker.run_id if tracker else None,
            checkpoint=str(trainer.checkpoint_path),
            output_dir=str(trainer.output_dir),
            backbone=backbone,
            epochs_done=trainer.position.epoch,
            steps=trainer.position.step,
            seconds=round(seconds, 2),
            images_per_s=round(images_seen / seconds, 1) if seconds > 0 else 0.0,
            last_loss=trainer.records.last_loss,
            interrupted=interrupted,
            tracking_uri=tracker.tracking_uri if tracker else None,
            experiment_id=tracker.experiment_id if tracker else None,
            model_id=trainer.model_id,
            eval=eval_result.metrics() if eval_result else {},
        )

    def to_json(self) -> dict[str, Any]:
        summary = {k: v for k, v in self.__dict__.items() if k != "eval"}
        summary.update(self.eval)
        return summary


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag checked between steps, so the run stops at a clean boundary."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signal_number is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal_number = signum
        log.warning("received signal %d: checkpointing after the current step", signum)

    def agreed(self, env: DistributedEnv, device: torch.device) -> bool:
        """True on every rank when any rank was signalled, so all ranks stop after the same step (a rank
        that went on alone would wait forever in the next collective)."""
        flag = self.signal_number is not None
        if not env.is_distributed:
            return flag
        shared = torch.tensor([int(flag)], device=device)
        torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MAX)
        return bool(shared.item())

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopRequest]:
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self)
        except ValueError:  # not the main thread: signals stay with their previous handlers
            pass
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def resolve_run_data(config: TrainConfig, env: DistributedEnv) -> tuple[Dataset, Dataset | None]:
    """The train and val data sets; rank 0 first, then the others: the built-in digits are converted
    once, by one process."""
    if not env.is_main:
        barrier(env)
    train = resolve_dataset(config.data, split="train")
    val = resolve_dataset(config.data, split="val") if config.data.val is not None else None
    if env.is_main:
        barrier(env)
    return train, val


def run_tags(config: TrainConfig, manifest_hash: str) -> dict[str, str]:
    """The MLflow tags of a training run."""
    return {
        "method": config.method_name,
        "backbone": config.model.backbone,
        "data_manifest_hash": manifest_hash,
        "git_commit": git_commit(),
        "stage": "pretrain",
    }


class Trainer:
    """Holds the pieces of one run; ``run()`` is the loop."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        progress: bool = True,
        parent_run_id: str | None = None,
        dataset_prefix: str | None = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self.parent_run_id = parent_run_id
        self.dataset_prefix = dataset_prefix
        """Names the shard sets ``<prefix>/train`` and ``<prefix>/val`` in MLflow (default: their folders)."""
        self.model_id: str | None = None
        """The MLflow model logged from the final backbone (set at the end of a tracked run)."""
        self.env = DistributedEnv.from_environment()
        self.device = resolve_device(config.trainer.device, self.env)
        init_distributed(self.env, self.device)
        self.wait_group = waiting_group(self.env, config.trainer.wait_timeout_s)
        """Where ranks wait for rank 0's clustering and evaluation (None in one process)."""
        configure_cuda(self.device)
        if config.trainer.threads:
            torch.set_num_threads(config.trainer.threads)
        self.output_dir = Path(config.trainer.output_dir)
        self.checkpoints = RunCheckpoints(self.output_dir, self.env, self.device)
        self.checkpoint_path = self.checkpoints.path
        self.checkpoint = self.checkpoints.load_for_resume(resume)

        self.data, self.val_data = resolve_run_data(config, self.env)
        self.spec: MultiCropSpec = config.augment.to_spec()

        torch.manual_seed(config.trainer.seed)
        method = to_device_layout(
            build_method(
                config.method_name, config.model.backbone, config.method, config.model.backbone_kwargs
            ),
            self.device,
        )
        self.method: Method
        self.method, self.model = wrap_distributed(
            method, self.env, self.device, sync_batchnorm=config.model.sync_batchnorm
        )
        if config.trainer.compile:
            self.method.backbone.compile()
        self.precision = resolve_precision(config.trainer.precision, self.device)
        self.passes = RunPasses.for_run(
            config,
            self.data,
            self.val_data,
            self.precision,
            self.device,
            self.env,
            progress=progress,
            wait_group=self.wait_group,
        )
        self.optimizer = build_optimizer(config.optim, self.method)
        scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.step_fn = OptimizerStep(self.optimizer, clip_grad=config.optim.clip_grad, scaler=scaler)

        self.global_batch_size = config.trainer.batch_size * self.env.world_size
        self.steps_per_epoch = len(self._loader(epoch=0, start_batch=0, repeats=None))
        self.schedules = build_schedules(
            config.optim,
            global_batch_size=self.global_batch_size,
            steps_per_epoch=self.steps_per_epoch,
            epochs=config.trainer.epochs,
        )
        self.position = RunPosition(world_size=self.env.world_size, num_workers=config.data.num_workers)
        self.tracker: Tracker | None = None
        self.records = RunRecords(self.output_dir / METRICS_FILE, is_main=self.env.is_main)
        self.ctx = RunContext.of(self)
        if self.checkpoint is not None:
            self.position = self.checkpoints.restore(
                self.checkpoint,
                method=self.method,
                optimizer=self.optimizer,
                scaler=self.step_fn.scaler,
                num_workers=config.data.num_workers,
            )
            repeats = self.checkpoint.get("extra", {}).get("sample_repeats")
            self.ctx.sample_repeats = None if repeats is None else np.asarray(repeats)
        self.ctx.epoch, self.ctx.step = self.position.epoch, self.position.step

    # -- setup helpers ------------------------------------------------------------------------------
    def _loader(self, *, epoch: int, start_batch: int, repeats: np.ndarray | None) -> Any:
        cfg = self.config
        return build_loader(
            self.data.source,
            self.spec,
            cfg.trainer.batch_size,
            backend=cfg.data.backend,
            rank=self.env.rank,
            world_size=self.env.world_size,
            num_workers=cfg.data.num_workers,
            seed=cfg.trainer.seed,
            epoch=epoch,
            device=self.device,
            samples_per_epoch=cfg.data.samples_per_epoch,
            repeats=repeats,
            start_batch=start_batch,
        )

    def _save_checkpoint(self) -> None:
        extra: dict[str, Any] = {"mlflow_run_id": self.tracker.run_id if self.tracker else None}
        if self.ctx.sample_repeats is not None:
            extra["sample_repeats"] = torch.from_numpy(self.ctx.sample_repeats)
        self.checkpoints.save(
            method=self.method,
            optimizer=self.optimizer,
            scaler=self.step_fn.scaler,
            position=self.position,
            config_yaml=dump_yaml(self.config),
            extra=extra,
        )

    def _log_shard_sets(self) -> None:
        """The shard sets the run reads, as MLflow dataset inputs (the runs table's Dataset column)."""
        assert self.tracker is not None
        for split, context, data in (("train", "training", self.data), ("val", "evaluation", self.val_data)):
            if data is not None:
                name = shard_set_name(data, split, prefix=self.dataset_prefix)
                self.tracker.log_shard_set(data.source.manifest, name, context)

    # -- things the method may ask for --------------------------------------------------------------
    def extract(self, module: nn.Module, *, name: str) -> FeatureBank:
        """The extraction pass over the training set (eval view), row i for sample i."""
        return self.passes.extract(module, name=name, epoch=self.position.epoch)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        self.records.log(metrics, step=step)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> TrainSummary:
        cfg = self.config
        if self.env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / CONFIG_FILE).write_text(dump_yaml(cfg), encoding="utf-8")
        if self.checkpoint is not None:  # steps logged after the checkpoint are about to run again
            self.records.rewind(self.position.step)
        resumed_run = (self.checkpoint or {}).get("extra", {}).get("mlflow_run_id")
        self.tracker = open_tracker(
            cfg.tracking,
            run_name=f"{cfg.method_name}-{cfg.model.backbone}",
            rank=self.env.rank,
            run_id=resumed_run,
            parent_run_id=self.parent_run_id,
            tags=run_tags(cfg, self.data.manifest_hash),
        )
        with tracking_run(self.tracker) as outcome, _StopRequest().installed() as stop:
            self.records.attach(self.tracker, resumed=resumed_run is not None)
            if resumed_run is None:
                self.tracker.log_params(flatten(to_dict(cfg)))
                self.tracker.log_text(dump_yaml(cfg), CONFIG_FILE)
                self._log_shard_sets()
            summary = self._train(stop)
            if summary.interrupted:  # stopped on a signal: the run is not finished, --resume continues it
                outcome.status = "KILLED"
        summary.tracking_error = self.tracker.error  # known once the run is closed (closing can fail too)
        return summary

    def _train(self, stop: _StopRequest) -> TrainSummary:
        cfg, ctx, position = self.config, self.ctx, self.position
        start_time, images_seen = time.perf_counter(), 0
        self.method.on_train_start(ctx)
        eval_result: EvalResult | None = None
        while position.epoch < cfg.trainer.epochs:
            ctx.epoch = position.epoch
            if position.batch_in_epoch == 0:
                self.method.on_epoch_start(ctx)
            loader = self._loader(
                epoch=position.epoch, start_batch=position.batch_in_epoch, repeats=ctx.sample_repeats
            )
            self.model.train()
            window = MetricWindow(position.epoch)
            bar = EpochProgress(
                epoch=position.epoch,
                epochs=cfg.trainer.epochs,
                total=_length(loader),
                enabled=self.env.is_main and wants_progress(self.progress),
            )
            fetch_start = time.perf_counter()
            for batch in loader:
                data_time = time.perf_counter() - fetch_start
                schedule = self._train_step(batch.to(self.device), window)
                images_seen += batch.size * self.env.world_size
                window.add_time(data_time=data_time, step_time=time.perf_counter() - fetch_start)
                bar.update(images=batch.size * self.env.world_size)
                if position.step % cfg.trainer.log_every == 0:
                    bar.show_loss(self._log_window(window, schedule))  # the loss is read here, not per step
                    window = MetricWindow(position.epoch)
                if stop.agreed(self.env, self.device):
                    bar.close()
                    self._log_window(window, None)  # the steps' records, not a partial window's means
                    self._save_checkpoint()
                    return TrainSummary.of(self, start_time, images_seen, eval_result, interrupted=True)
                fetch_start = time.perf_counter()
            bar.close()
            if window.count:
                self._log_window(window, schedule)
            position.epoch += 1
            position.batch_in_epoch = 0
            ctx.epoch = position.epoch
            last_epoch = position.epoch == cfg.trainer.epochs
            if last_epoch or position.epoch % cfg.trainer.checkpoint_every == 0:
                self._save_checkpoint()
            if self.val_data is not None and (
                last_epoch or (cfg.trainer.eval_every and position.epoch % cfg.trainer.eval_every == 0)
            ):
                eval_result = self.evaluate()
                self.log_metrics(eval_result.metrics(), step=position.step)
        backbone_path = self._finish(eval_result)
        return TrainSummary.of(self, start_time, images_seen, eval_result, backbone=backbone_path)

    def _train_step(self, batch: Batch, window: MetricWindow) -> tuple[float, float]:
        """One optimizer step on ``batch``; its values go to ``window`` unread. Returns (lr, wd)."""
        ctx, position = self.ctx, self.position
        ctx.step = position.step
        lr, wd = self.schedules.apply(self.optimizer, position.step)
        with autocast(self.device, self.precision):
            out = self.model(batch, ctx)
        grad_norm = self.step_fn(out.loss, self.method, ctx)
        self.method.on_step_end(ctx)
        images = batch.size * self.env.world_size
        window.add(position.step, out.loss, out.metrics, grad_norm, images=images)
        position.step += 1
        position.batch_in_epoch += 1
        return lr, wd

    def _log_window(self, window: MetricWindow, schedule: tuple[float, float] | None) -> float | None:
        """Read ``window`` (one host copy), write each step's record, stop on a non-finite loss, then
        log the window's means with the last step's (lr, wd); ``schedule`` None writes the records only.
        Returns the window's last loss (None for an empty window)."""
        values = window.read()
        bad = values.first_nonfinite()
        self.records.record_losses(values.epoch, values.steps[:bad], values.losses[:bad])
        if bad is not None:
            raise PipelineError(
                f"the loss became {values.losses[bad]} at step {values.steps[bad]}; lower optim.lr or check "
                "the data"
            )
        if schedule is not None and values.steps:
            lr, wd = schedule
            self.log_metrics({**values.summary, "lr": lr, "weight_decay": wd}, step=values.steps[-1])
        return values.losses[-1] if values.losses else None

    # -- evaluation and the end of the run ------------------------------------------------------------
    def evaluate(self) -> EvalResult:
        """k-NN (val against train features) and k-means NMI/ARI (val) of the method's feature extractor."""
        trainer = self.config.trainer
        return self.passes.evaluate(
            self.method.feature_extractor(),
            knn_k=trainer.knn_k,
            knn_temperature=trainer.knn_temperature,
            seed=trainer.seed,
        )

    def _finish(self, eval_result: EvalResult | None) -> str | None:
        if not self.env.is_main:
            return None
        assert self.tracker is not None
        extractor = self.method.feature_extractor()
        backbone_path = save_backbone(extractor, dump_yaml(self.config), self.output_dir / BACKBONE_NAME)
        self.tracker.log_artifact(backbone_path)
        if self.tracker.run_id is not None:  # the runs table's Models column, runs:/<id>/backbone
            # the saved file read back: a plain CPU module, without the run's DDP or compile wrappers
            module, _ = load_feature_extractor(backbone_path)
            self.model_id = self.tracker.log_model(module.eval(), "backbone")
        self.tracker.log_artifact(self.output_dir / CONFIG_FILE)
        loss_plot = plot_loss_curve(self.records.losses, self.output_dir / "loss.png")
        if loss_plot is not None:
            self.tracker.log_artifact(loss_plot, "plots")
        if self.val_data is not None and hasattr(extractor, "last_selfattention"):
            images = self.passes.val_images(4)
            self.tracker.log_artifact(
                plot_model_attention(extractor, images, self.output_dir / "attention.png"), "plots"
            )
        return str(backbone_path)


def _length(loader: Any) -> int | None:
    """Batches in the epoch, when the loader knows (the bar then shows a fraction and a time left)."""
    try:
        return len(loader)
    except TypeError:
        return None


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    parent_run_id: str | None = None,
    dataset_prefix: str | None = None,
) -> TrainSummary:
    """Run (or resume) one training run and return its summary; ``parent_run_id`` nests its MLflow run,
    ``dataset_prefix`` names its shard sets there (see ``Trainer``)."""
    env = DistributedEnv.from_environment()
    device = resolve_device(config.trainer.device, env)
    init_distributed(env, device)  # the lock's decision is shared over the process group
    # claimed before the Trainer looks for a checkpoint, so a run started beside a live one cannot pass
    # that check, and held until the run has written its last file
    with lock_directory(
        config.trainer.output_dir,
        owner="training",
        hint="choose another --set trainer.output_dir=…",
        env=env,
        device=device,
    ):
        return Trainer(
            config,
            resume=resume,
            progress=progress,
            parent_run_id=parent_run_id,
            dataset_prefix=dataset_prefix,
        ).run()


__all__ = ["Batch", "RunContext", "TrainSummary", "Trainer", "train"]
