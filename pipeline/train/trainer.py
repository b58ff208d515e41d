"""The training loop: one for every method, readable top to bottom.

    config → data, views, method, optimizer, schedules → (resume) → for each epoch:
        method.on_epoch_start(ctx)            # DeepCluster/PCL: extraction pass + clustering
        for batch in loader:                  # exact epoch, same batch count on every rank
            loss = method(batch)              # under autocast
            step(loss)                        # scale, backward, unscale, clip, drop frozen grads, step
            method.on_step_end(ctx)           # EMA teacher, queues, centres
        checkpoint, evaluate
    → final evaluation, backbone weights, plots, MLflow artifacts

Everything a resume needs is in the checkpoint, and every source of randomness in a step is a function
of (seed, epoch, sample index, step), so an interrupted and resumed CPU run reproduces the losses of an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clusterssl.config import dump_yaml, flatten, to_dict
from clusterssl.errors import PipelineError
from clusterssl.models.factory import build_method
from clusterssl.models.method import Method
from clusterssl.models.types import Batch, FeatureBank
from clusterssl.pipeline.data.datasets import Dataset, resolve_dataset
from clusterssl.pipeline.data.loader import build_loader
from clusterssl.pipeline.data.spec import MultiCropSpec
from clusterssl.pipeline.features.evaluation import EvalResult, evaluate_features, extract_eval_features
from clusterssl.pipeline.features.extraction import ExtractionSettings, extract_features
from clusterssl.pipeline.tracking.plots import attention_maps, plot_attention_maps, plot_loss_curve
from clusterssl.pipeline.tracking.runs import Tracker, git_commit, open_tracker, tracking_run
from clusterssl.pipeline.train.checkpoint import (
    BACKBONE_NAME,
    LAST_NAME,
    RunPosition,
    atomic_save,
    load_checkpoint,
    make_checkpoint,
    position_of,
    restore_rng_state,
    save_backbone,
)
from clusterssl.pipeline.train.optim import OptimizerStep, build_optimizer, build_schedules
from clusterssl.pipeline.train.precision import autocast, resolve_precision
from clusterssl.pipeline.train.progress import EpochProgress, wants_progress
from clusterssl.pipeline.train.train_config import TrainConfig
from clusterssl.pipeline.train.world import (
    DistributedEnv,
    barrier,
    init_distributed,
    resolve_device,
    same_on_all_ranks,
)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


@dataclass
class RunContext:
    """The ``models.method.TrainContext`` the trainer hands to a method's hooks."""

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

    def extract(self, module: nn.Module, *, name: str) -> FeatureBank:
        return self.trainer.extract(module, name=name)

    def set_sample_repeats(self, repeats: np.ndarray | None) -> None:
        if repeats is not None and repeats.shape != (self.num_samples,):
            raise PipelineError(f"sample repeats must have shape ({self.num_samples},), got {repeats.shape}")
        self.sample_repeats = repeats

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self.trainer.log_metrics(metrics, step=self.step)

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
    eval: dict[str, float] = field(default_factory=dict)

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


class Trainer:
    """Holds the pieces of one run; ``run()`` is the loop."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        progress: bool = True,
        parent_run_id: str | None = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self.parent_run_id = parent_run_id
        self.env = DistributedEnv.from_environment()
        self.device = resolve_device(config.trainer.device, self.env)
        init_distributed(self.env, self.device)
        if config.trainer.threads:
            torch.set_num_threads(config.trainer.threads)
        self.output_dir = Path(config.trainer.output_dir)
        self.checkpoint_path = self.output_dir / LAST_NAME
        self.checkpoint = self._load_resume_checkpoint(resume)

        self.data, self.val_data = self._resolve_data()
        self.spec: MultiCropSpec = config.augment.to_spec()
        self.eval_spec: MultiCropSpec = config.augment.eval_spec()

        torch.manual_seed(config.trainer.seed)
        self.method: Method = build_method(
            config.method_name, config.model.backbone, config.method, config.model.backbone_kwargs
        ).to(self.device)
        self.model: nn.Module = self._wrap_distributed(self.method)
        if config.trainer.compile:
            self.method.backbone.compile()
        self.precision = resolve_precision(config.trainer.precision, self.device)
        # the training-set passes (clustering, evaluation) read and embed like the standalone extraction
        self.extraction = ExtractionSettings(
            batch_size=config.trainer.eval_batch_size,
            backend=config.data.backend,
            num_workers=config.data.num_workers,
            precision=self.precision,
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
        self._metrics_file: Path = self.output_dir / METRICS_FILE
        self.losses: list[tuple[int, float]] = []
        if self.checkpoint is not None:
            self._restore(self.checkpoint)

    # -- setup helpers ------------------------------------------------------------------------------
    def _load_resume_checkpoint(self, resume: bool) -> dict[str, Any] | None:
        found = self.checkpoint_path.exists()
        checkpoint = load_checkpoint(self.checkpoint_path) if resume and found else None
        self._check_ranks_see_the_same_checkpoint(found, checkpoint)
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

    def _check_ranks_see_the_same_checkpoint(self, found: bool, checkpoint: dict[str, Any] | None) -> None:
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

    def _resolve_data(self) -> tuple[Dataset, Dataset | None]:
        """Rank 0 first, then the others: the built-in digits are converted once, by one process."""
        if not self.env.is_main:
            barrier(self.env)
        train = resolve_dataset(self.config.data, split="train")
        val = resolve_dataset(self.config.data, split="val") if self.config.data.val is not None else None
        if self.env.is_main:
            barrier(self.env)
        return train, val

    def _rank_state_path(self) -> Path:
        """Where rank r > 0 keeps its own buffers (SwAV's queue, BatchNorm statistics) between runs."""
        return self.output_dir / f"checkpoint.rank{self.env.rank}.pt"

    def _wrap_distributed(self, method: Method) -> nn.Module:
        if not self.env.is_distributed:
            return method
        if self.config.model.sync_batchnorm:
            if self.device.type != "cuda":
                raise PipelineError(
                    "model.sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm does not run on CPUs)"
                )
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
            self.method = method
        # Queues and centres are per rank or all-reduced by the method itself: never broadcast buffers.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(method, device_ids=device_ids, broadcast_buffers=False)

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

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.method.load_state_dict(checkpoint["method"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.step_fn.scaler is not None and checkpoint.get("scaler"):
            self.step_fn.scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"])
        saved = position_of(checkpoint)
        same_layout = (saved.world_size, saved.num_workers) == (
            self.env.world_size,
            self.config.data.num_workers,
        )
        if saved.batch_in_epoch and not same_layout:
            log.warning(
                "the checkpoint was taken mid-epoch with %d rank(s) × %d worker(s); with a different layout "
                "the epoch restarts from its first batch",
                saved.world_size,
                saved.num_workers,
            )
            saved.step -= saved.batch_in_epoch
            saved.batch_in_epoch = 0
        if self.env.rank > 0 and saved.world_size == self.env.world_size and self._rank_state_path().exists():
            buffers = load_checkpoint(self._rank_state_path())["method"]
            self.method.load_state_dict({**self.method.state_dict(), **buffers})
        saved.world_size, saved.num_workers = self.env.world_size, self.config.data.num_workers
        self.position = saved
        self.sample_repeats = checkpoint.get("extra", {}).get("sample_repeats")

    def _save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint; under DDP every other rank keeps its own buffers beside it (its
        queue differs from rank 0's), so a resume on the same world size restores each rank exactly."""
        if not self.env.is_main:
            buffers = {name: buffer for name, buffer in self.method.named_buffers()}
            atomic_save(
                make_checkpoint(
                    method_state=buffers,
                    optimizer_state={},
                    scaler_state=None,
                    position=self.position,
                    config_yaml="",
                ),
                self._rank_state_path(),
            )
            return
        extra: dict[str, Any] = {"mlflow_run_id": self.tracker.run_id if self.tracker else None}
        if self.ctx.sample_repeats is not None:
            extra["sample_repeats"] = torch.from_numpy(self.ctx.sample_repeats)
        payload = make_checkpoint(
            method_state=self.method.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            scaler_state=self.step_fn.scaler.state_dict() if self.step_fn.scaler else None,
            position=self.position,
            config_yaml=dump_yaml(self.config),
            extra=extra,
        )
        atomic_save(payload, self.checkpoint_path)

    # -- things the method may ask for --------------------------------------------------------------
    def extract(self, module: nn.Module, *, name: str) -> FeatureBank:
        """The extraction pass over the training set (eval view), row i for sample i."""
        bank = extract_features(
            module,
            self.data.source,
            spec=self.eval_spec,
            settings=self.extraction,
            device=self.device,
            env=self.env,
            out_dir=self.output_dir / f"bank-{name}",
            source={
                "module": name,
                "epoch": self.position.epoch,
                "manifest": self.data.manifest_hash,
                "manifest_path": self.data.manifest_path,
            },
            progress=self.progress and self.env.is_main,
        )
        return bank.as_feature_bank()

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=step)
        self._append_metrics({"step": step, **metrics})

    def _append_metrics(self, record: Mapping[str, Any]) -> None:
        if self.env.is_main:
            with open(self._metrics_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> TrainSummary:
        cfg = self.config
        if self.env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / CONFIG_FILE).write_text(dump_yaml(cfg), encoding="utf-8")
        resumed_run = (self.checkpoint or {}).get("extra", {}).get("mlflow_run_id")
        self.tracker = open_tracker(
            cfg.tracking,
            run_name=f"{cfg.method_name}-{cfg.model.backbone}",
            rank=self.env.rank,
            run_id=resumed_run,
            parent_run_id=self.parent_run_id,
            tags=self._tags(),
        )
        self.ctx = RunContext(
            epoch=self.position.epoch,
            epochs=cfg.trainer.epochs,
            step=self.position.step,
            steps_per_epoch=self.steps_per_epoch,
            rank=self.env.rank,
            world_size=self.env.world_size,
            device=self.device,
            num_samples=self.data.num_samples,
            trainer=self,
        )
        repeats = getattr(self, "sample_repeats", None)
        if repeats is not None:
            self.ctx.sample_repeats = np.asarray(repeats)
        with tracking_run(self.tracker) as outcome, _StopRequest().installed() as stop:
            if resumed_run is None:
                self.tracker.log_params(flatten(to_dict(cfg)))
                self.tracker.log_text(dump_yaml(cfg), CONFIG_FILE)
            summary = self._train(stop)
            if summary.interrupted:  # stopped on a signal: the run is not finished, --resume continues it
                outcome.status = "KILLED"
            return summary

    def _tags(self) -> dict[str, str]:
        cfg = self.config
        return {
            "method": cfg.method_name,
            "backbone": cfg.model.backbone,
            "data_manifest_hash": self.data.manifest_hash,
            "git_commit": git_commit(),
            "stage": "pretrain",
        }

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
            window = _MetricWindow()
            bar = EpochProgress(
                epoch=position.epoch,
                epochs=cfg.trainer.epochs,
                total=_length(loader),
                enabled=self.env.is_main and wants_progress(self.progress),
            )
            fetch_start = time.perf_counter()
            for batch in loader:
                batch = batch.to(self.device)
                data_time = time.perf_counter() - fetch_start
                ctx.step = position.step
                lr, wd = self.schedules.apply(self.optimizer, position.step)
                with autocast(self.device, self.precision):
                    out = self.model(batch)
                grad_norm = self.step_fn(out.loss, self.method, ctx)
                self.method.on_step_end(ctx)
                loss = float(out.loss.detach())
                if not np.isfinite(loss):
                    raise PipelineError(
                        f"the loss became {loss} at step {position.step}; lower optim.lr or check the data"
                    )
                position.step += 1
                position.batch_in_epoch += 1
                images_seen += batch.size * self.env.world_size
                step_time = time.perf_counter() - fetch_start
                self._append_metrics({"step": position.step - 1, "epoch": position.epoch, "loss": loss})
                self.losses.append((position.step - 1, loss))
                bar.update(loss=loss, images=batch.size * self.env.world_size)
                window.add(
                    loss, out.metrics, batch.size * self.env.world_size, data_time, step_time, grad_norm
                )
                if position.step % cfg.trainer.log_every == 0:
                    self._log_window(window, lr=lr, wd=wd, step=position.step - 1)
                    window = _MetricWindow()
                if self._agree_to_stop(stop):
                    bar.close()
                    self._save_checkpoint()
                    return self._summary(start_time, images_seen, interrupted=True, eval_result=eval_result)
                fetch_start = time.perf_counter()
            bar.close()
            if window.count:
                self._log_window(window, lr=lr, wd=wd, step=position.step - 1)
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
        return self._summary(
            start_time, images_seen, interrupted=False, eval_result=eval_result, backbone=backbone_path
        )

    def _agree_to_stop(self, stop: _StopRequest) -> bool:
        """True on every rank when any rank was signalled, so all ranks stop after the same step (a rank
        that went on alone would wait forever in the next collective)."""
        flag = stop.signal_number is not None
        if not self.env.is_distributed:
            return flag
        shared = torch.tensor([int(flag)], device=self.device)
        torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MAX)
        return bool(shared.item())

    def _log_window(self, window: _MetricWindow, *, lr: float, wd: float, step: int) -> None:
        self.log_metrics({**window.summary(), "lr": lr, "weight_decay": wd}, step=step)

    # -- evaluation and the end of the run ------------------------------------------------------------
    def evaluate(self) -> EvalResult:
        """k-NN (val against train features) and k-means NMI/ARI (val) of the method's feature extractor."""
        assert self.val_data is not None
        extractor = self.method.feature_extractor()
        common = dict(
            spec=self.eval_spec,
            settings=self.extraction,
            device=self.device,
            env=self.env,
        )
        train = extract_eval_features(extractor, self.data.source, **common)
        val = extract_eval_features(extractor, self.val_data.source, **common)
        return evaluate_features(
            train,
            val,
            k=self.config.trainer.knn_k,
            temperature=self.config.trainer.knn_temperature,
            seed=self.config.trainer.seed,
        )

    def _finish(self, eval_result: EvalResult | None) -> str | None:
        if not self.env.is_main:
            return None
        assert self.tracker is not None
        extractor = self.method.feature_extractor()
        backbone_path = save_backbone(extractor, dump_yaml(self.config), self.output_dir / BACKBONE_NAME)
        self.tracker.log_artifact(backbone_path)
        self.tracker.log_artifact(self.output_dir / CONFIG_FILE)
        loss_plot = plot_loss_curve(self.losses, self.output_dir / "loss.png")
        if loss_plot is not None:
            self.tracker.log_artifact(loss_plot, "plots")
        if self.val_data is not None and hasattr(extractor, "last_selfattention"):
            self.tracker.log_artifact(self._plot_attention(extractor), "plots")
        return str(backbone_path)

    def _plot_attention(self, vit: nn.Module, num_images: int = 4) -> Path:
        """DINO's picture: the last block's CLS attention per head, for a few val images."""
        assert self.val_data is not None
        loader = build_loader(
            self.val_data.source,
            self.eval_spec,
            num_images,
            backend="torch",
            num_workers=0,
            shuffle=False,
            device=self.device,
        )
        images = next(iter(loader)).views[0].to(self.device)
        was_training = vit.training
        vit.eval()
        maps = attention_maps(vit, images)
        vit.train(was_training)
        return plot_attention_maps(images, maps, self.output_dir / "attention.png")

    def _summary(
        self,
        start_time: float,
        images_seen: int,
        *,
        interrupted: bool,
        eval_result: EvalResult | None,
        backbone: str | None = None,
    ) -> TrainSummary:
        seconds = time.perf_counter() - start_time
        return TrainSummary(
            run_id=self.tracker.run_id if self.tracker else None,
            checkpoint=str(self.checkpoint_path),
            output_dir=str(self.output_dir),
            backbone=backbone,
            epochs_done=self.position.epoch,
            steps=self.position.step,
            seconds=round(seconds, 2),
            images_per_s=round(images_seen / seconds, 1) if seconds > 0 else 0.0,
            last_loss=self.losses[-1][1] if self.losses else None,
            interrupted=interrupted,
            tracking_uri=self.tracker.tracking_uri if self.tracker else None,
            eval=eval_result.metrics() if eval_result else {},
        )


def _length(loader: Any) -> int | None:
    """Batches in the epoch, when the loader knows (the bar then shows a fraction and a time left)."""
    try:
        return len(loader)
    except TypeError:
        return None


class _MetricWindow:
    """Averages of the per-step values between two log points."""

    def __init__(self) -> None:
        self.count = 0
        self.loss = 0.0
        self.images = 0
        self.data_time = 0.0
        self.step_time = 0.0
        self.method_metrics: dict[str, float] = {}
        self.grad_norms: list[float] = []

    def add(
        self,
        loss: float,
        metrics: Mapping[str, float],
        images: int,
        data_time: float,
        step_time: float,
        grad_norm: float | None,
    ) -> None:
        self.count += 1
        self.loss += loss
        self.images += images
        self.data_time += data_time
        self.step_time += step_time
        for key, value in metrics.items():
            self.method_metrics[key] = self.method_metrics.get(key, 0.0) + float(value)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)

    def summary(self) -> dict[str, float]:
        summary = {
            "loss": self.loss / self.count,
            "images_per_s": self.images / self.step_time if self.step_time > 0 else 0.0,
            "data_wait_share": self.data_time / self.step_time if self.step_time > 0 else 0.0,
        }
        summary.update({key: value / self.count for key, value in self.method_metrics.items()})
        if self.grad_norms:
            summary["grad_norm"] = float(np.mean(self.grad_norms))
        return summary


def train(
    config: TrainConfig, *, resume: bool = False, progress: bool = True, parent_run_id: str | None = None
) -> TrainSummary:
    """Run (or resume) one training run and return its summary; ``parent_run_id`` nests its MLflow run."""
    return Trainer(config, resume=resume, progress=progress, parent_run_id=parent_run_id).run()


__all__ = ["Batch", "RunContext", "TrainSummary", "Trainer", "train"]
