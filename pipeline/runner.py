"""``clusterssl run PIPELINE.yaml``: convert → pretrain → extract → cluster → evaluate, one MLflow parent run
with a child run per stage.

Every stage records what it produced in ``WORKDIR/stages/<stage>.json`` together with a fingerprint of
everything it depends on (its own settings and the fingerprints of the stages it reads from). Running the
same pipeline again skips every stage whose fingerprint matches and whose outputs still exist; a stage
that was interrupted (its record says ``running``) is resumed — the conversion through its journal, the
pretraining from its checkpoint, the extraction from its bank's written-rows bitmap. Skipped stages
still get a child run (tagged ``skipped``) that points at the run and outputs they reuse, so the MLflow
record of every pipeline run can be followed from the final k-NN figure back to the shards' manifest.

Under torchrun (or one srun task per rank) the pretrain and extract stages run on every rank, as
``clusterssl train``/``extract`` do; convert, cluster and evaluate run on rank 0 while the others wait.
Rank 0 alone reads and writes the stage records and the MLflow runs, and tells the other ranks which
stages to skip or resume, so every rank takes the same path through the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterssl.config import apply_overrides, flatten, from_dict, read_yaml, to_dict
from clusterssl.errors import PipelineError
from clusterssl.pipeline.tracking.runs import Tracker, TrackingConfig, open_tracker, tracking_run
from clusterssl.pipeline.train.world import (
    DistributedEnv,
    barrier,
    init_distributed,
    on_rank0,
    resolve_device,
    shutdown_distributed,
    waiting_group,
)

if TYPE_CHECKING:
    from clusterssl.pipeline.features.extraction import ExtractionSettings

log = logging.getLogger(__name__)

STAGES = ("convert", "pretrain", "extract", "cluster", "evaluate")


@dataclass
class ConvertSection:
    source: str = "digits"
    """digits, imagefolder, list or idx (as `clusterssl shards convert SOURCE`)."""
    path: str | None = None
    """The image folder, list file or directory of IDX files (not for digits). An IDX directory is split
    already: its train pair becomes OUT/train and its test (t10k) pair OUT/test, the evaluation set, so
    it takes no hold-out."""
    out: str = "data/digits"
    """Where the shard sets go; with a hold-out, OUT/train and OUT/val."""
    holdout: float | None = 0.1
    """Stratified fraction written to OUT/val for evaluation; null writes everything to OUT."""
    samples_per_shard: int | None = 256
    image_size: int = 32
    """digits only: side of the rendered images."""
    seed: int = 0
    workers: int = 2


@dataclass
class PretrainSection:
    config: str = "swav_digits"
    """A training config: a path or a bundled name (configs/<name>.yaml)."""
    overrides: list[str] = field(default_factory=list)
    """--set style overrides applied to it, e.g. [trainer.epochs=5]."""


@dataclass
class ExtractSection:
    enabled: bool = True
    batch_size: int = 256
    dtype: str = "float32"
    """float32 or float16 (halves the bank on disk)."""


@dataclass
class ClusterSection:
    enabled: bool = True
    k: list[int] = field(default_factory=lambda: [10])
    """One k-means per value; NMI/ARI against the labels are logged for each."""
    spherical: bool = False
    niter: int = 20
    seed: int = 0


@dataclass
class EvaluateSection:
    k: int = 20
    temperature: float = 0.07
    baseline: bool = True
    """Also evaluate the same architecture at random init (the floor), in the same stage."""


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    workdir: str = "runs/pipeline"
    """Every stage's outputs and records go under this directory."""
    backend: str = "auto"
    num_workers: int = 2
    device: str = "auto"
    wait_timeout_s: float = 6 * 3600.0
    """Under torchrun: how long the other ranks wait while rank 0 converts, clusters or evaluates alone.
    Raise it for conversions or clusterings of very large sets."""
    convert: ConvertSection = field(default_factory=ConvertSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    extract: ExtractSection = field(default_factory=ExtractSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_pipeline_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    return from_dict(PipelineConfig, apply_overrides(read_yaml(path), list(overrides)))


def fingerprint(*parts: Any) -> str:
    payload = json.dumps([to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class StageRecord:
    stage: str
    fingerprint: str
    status: str
    """running (started, not finished) or complete."""
    outputs: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    seconds: float = 0.0


@dataclass
class StageResult:
    record: StageRecord
    skipped: bool


@dataclass
class PipelineSummary:
    name: str
    run_id: str | None
    stages: dict[str, StageResult]
    seconds: float
    interrupted: bool = False
    tracking_uri: str | None = None
    """The MLflow store the pipeline run went to (None: not tracked)."""
    experiment_id: str | None = None
    tracking_error: str | None = None
    """Why tracking of the pipeline run stopped early (None: its MLflow record is complete)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "tracking_error": self.tracking_error,
            "seconds": round(self.seconds, 2),
            "interrupted": self.interrupted,
            "stages": {
                name: {
                    "skipped": result.skipped,
                    "status": result.record.status,
                    "run_id": result.record.run_id,
                    "seconds": round(result.record.seconds, 2),
                    "outputs": result.record.outputs,
                }
                for name, result in self.stages.items()
            },
        }


class _Interrupted(Exception):
    """The pretraining stopped on a signal after checkpointing; the pipeline stops and can be re-run."""


class PipelineRunner:
    def __init__(
        self, config: PipelineConfig, *, progress: bool = True, env: DistributedEnv | None = None
    ) -> None:
        self.config = config
        self.env = env or DistributedEnv()
        self.progress = progress and self.env.is_main
        self.workdir = Path(config.workdir)
        self.records_dir = self.workdir / "stages"
        self.parent: Tracker | None = None
        self._wait_group: Any = None

    def _on_rank0(self, what: str, work: Callable[[], Any]) -> Any:
        """``work`` on rank 0, its result on every rank (just ``work()`` in one process)."""
        return on_rank0(self.env, work, self._wait_group, what)

    # -- records ------------------------------------------------------------------------------------
    def _record_path(self, stage: str) -> Path:
        return self.records_dir / f"{stage}.json"

    def _read_record(self, stage: str) -> StageRecord | None:
        path = self._record_path(stage)
        if not path.is_file():
            return None
        try:
            return StageRecord(**json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError):
            return None

    def _write_record(self, record: StageRecord) -> None:
        self.records_dir.mkdir(parents=True, exist_ok=True)
        path = self._record_path(record.stage)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record.__dict__, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, path)

    # -- stage driver -------------------------------------------------------------------------------
    def _stage(
        self,
        stage: str,
        stage_fingerprint: str,
        outputs_exist: Callable[[StageRecord], bool],
        run: Callable[[bool], tuple[dict[str, Any], str | None]],
        *,
        every_rank: bool = False,
    ) -> StageResult:
        """Skip ``stage`` when its record matches and its outputs exist; else run it (``run(resuming)``
        returns the outputs and the MLflow run id of its child run).

        ``every_rank``: every rank calls this and runs ``run``; rank 0's reading of the record decides for
        all, and its final record (outputs, run id) is the one every rank returns.
        """

        def decide() -> tuple[StageRecord | None, bool, bool]:
            previous = self._read_record(stage)
            same = previous is not None and previous.fingerprint == stage_fingerprint
            skip = same and previous.status == "complete" and outputs_exist(previous)  # type: ignore[union-attr]
            resuming = same and previous.status == "running"  # type: ignore[union-attr]
            return previous, skip, resuming

        share = self._on_rank0 if every_rank else (lambda _what, work: work())
        previous, skip, resuming = share(f"the {stage} stage", decide)
        if skip:
            assert previous is not None
            self._log_skipped(previous)
            return StageResult(previous, skipped=True)
        if previous is not None and not resuming:
            log.info("%s: settings or inputs changed since the last run; running it again", stage)
        started = time.perf_counter()
        if self.env.is_main:
            self._write_record(StageRecord(stage, stage_fingerprint, "running"))
        outputs, run_id = run(resuming)
        record = StageRecord(
            stage, stage_fingerprint, "complete", outputs, run_id, seconds=time.perf_counter() - started
        )
        if self.env.is_main:
            self._write_record(record)
        return StageResult(share(f"the {stage} stage", lambda: record), skipped=False)

    def _child(self, stage: str, tags: Mapping[str, str] | None = None) -> Tracker:
        assert self.parent is not None
        tracking = replace(self.config.tracking, run_name=f"{self.config.name}/{stage}")
        return open_tracker(
            tracking,
            run_name=tracking.run_name or stage,
            rank=self.env.rank,
            parent_run_id=self.parent.run_id,
            tags={"stage": stage, "pipeline": self.config.name, **(tags or {})},
        )

    def _log_skipped(self, record: StageRecord) -> None:
        child = self._child(record.stage, {"skipped": "true", "reused_run_id": str(record.run_id)})
        with tracking_run(child):
            child.log_params(flatten({"outputs": record.outputs, "fingerprint": record.fingerprint}))

    # -- the pipeline -------------------------------------------------------------------------------
    def run(self) -> PipelineSummary:
        started = time.perf_counter()
        tracking = replace(self.config.tracking, run_name=f"pipeline-{self.config.name}")
        self._wait_group = waiting_group(self.env, self.config.wait_timeout_s)
        self.parent = open_tracker(
            tracking,
            run_name=tracking.run_name or "pipeline",
            rank=self.env.rank,
            tags={"stage": "pipeline", "pipeline": self.config.name},
        )
        parent_run_id = self.parent.run_id
        results: dict[str, StageResult] = {}
        interrupted = False
        status = "FINISHED"
        try:
            self.parent.log_params(flatten(to_dict(self.config)))
            results["convert"] = self._on_rank0("the convert stage", self._convert)
            results["pretrain"] = self._pretrain(results["convert"])
            if self.config.extract.enabled:
                results["extract"] = self._extract(results["pretrain"])
                if self.config.cluster.enabled:
                    extract = results["extract"]
                    results["cluster"] = self._on_rank0("the cluster stage", lambda: self._cluster(extract))
            if results["convert"].record.outputs.get("val"):
                convert, pretrain = results["convert"], results["pretrain"]
                results["evaluate"] = self._on_rank0(
                    "the evaluate stage", lambda: self._evaluate(convert, pretrain)
                )
                self.parent.log_metrics(
                    {k: v for k, v in results["evaluate"].record.outputs.items() if isinstance(v, float)},
                    step=0,
                )
        except _Interrupted:
            interrupted, status = True, "KILLED"
        except BaseException:
            self.parent.close("FAILED")
            raise
        self.parent.close(status)
        return PipelineSummary(
            self.config.name,
            parent_run_id,
            results,
            time.perf_counter() - started,
            interrupted,
            tracking_uri=self.parent.tracking_uri,
            experiment_id=self.parent.experiment_id,
            tracking_error=self.parent.error,
        )

    # -- stages -------------------------------------------------------------------------------------
    def _convert(self) -> StageResult:
        """Always asks the converter, which is a no-op (status `unchanged`) when the shards are current
        and resumes an interrupted conversion through its journal."""
        section = self.config.convert
        started = time.perf_counter()
        outcome, sets = self._convert_sets()
        outputs: dict[str, Any] = {
            name: {
                "dir": str(s.directory),
                "manifest_hash": s.manifest.content_hash(),
                "count": s.manifest.count,
            }
            for name, s in sets.items()
        }
        record = StageRecord("convert", fingerprint(section, outputs), "complete", outputs)
        record.seconds = time.perf_counter() - started
        if outcome.unchanged:
            previous = self._read_record("convert")
            if previous is not None and previous.fingerprint == record.fingerprint:
                self._log_skipped(previous)
                return StageResult(previous, skipped=True)
        child = self._child("convert")
        with tracking_run(child):
            child.log_params(flatten({"convert": to_dict(section)}))
            for name, s in sets.items():
                child.log_metrics(
                    {
                        f"{name}_count": float(s.manifest.count),
                        f"{name}_skipped": float(len(s.manifest.skipped)),
                    },
                    step=0,
                )
                child.log_artifact(Path(s.directory) / "manifest.json", f"manifests/{name}")
                child.log_shard_set(s.manifest, self._set_name(name), context=name)
            record.run_id = child.run_id
        self._write_record(record)
        return StageResult(record, skipped=False)

    def _convert_sets(self) -> tuple[Any, dict[str, Any]]:
        """Run the converter; returns its outcome and the sets by role (``train``, ``val``)."""
        from clusterssl.shards.convert import ConvertOptions, convert, merge_outcomes
        from clusterssl.shards.idx import convert_idx_directory, find_pairs
        from clusterssl.shards.sources import open_source

        section = self.config.convert
        options = ConvertOptions(
            samples_per_shard=section.samples_per_shard,
            holdout=section.holdout,
            seed=section.seed,
            workers=section.workers,
        )
        out = Path(section.out)
        if section.source == "idx" and section.path is not None and Path(section.path).is_dir():
            if section.holdout is not None:
                raise PipelineError(
                    "convert.holdout splits one set; a directory of IDX pairs is split already"
                )
            if set(find_pairs(Path(section.path))) != {"train", "test"}:  # checked before converting any
                raise PipelineError(f"{section.path} needs a train and a test (t10k) IDX pair")
            outcomes = convert_idx_directory(Path(section.path), out, options, progress=self.progress)
            roles = {"train": outcomes["train"].sets[0], "val": outcomes["test"].sets[0]}
            return merge_outcomes(list(outcomes.values())), roles
        source = open_source(section.source, section.path, image_size=section.image_size)
        outcome = convert(source, out, options, progress=self.progress)
        return outcome, {s.name or "train": s for s in outcome.sets}

    def _train_config(self, convert: StageResult) -> Any:
        from clusterssl.config import resolve_config_path
        from clusterssl.pipeline.train.train_config import build_train_config

        outputs = convert.record.outputs
        data = read_yaml(resolve_config_path(self.config.pretrain.config))
        overrides = [
            *self.config.pretrain.overrides,
            f"data.train={outputs['train']['dir']}",
            f"data.val={outputs['val']['dir']}" if "val" in outputs else "data.val=null",
            f"trainer.output_dir={self.workdir / 'pretrain'}",
        ]
        config = build_train_config(data, overrides)
        config.tracking = replace(self.config.tracking, run_name=f"{self.config.name}/pretrain")
        return config

    def _pretrain(self, convert: StageResult) -> StageResult:
        from clusterssl.pipeline.train.trainer import train

        config = self._train_config(convert)
        stage_fingerprint = fingerprint(convert.record.fingerprint, config)
        output_dir = Path(config.trainer.output_dir)

        def run(resuming: bool) -> tuple[dict[str, Any], str | None]:
            if not resuming and output_dir.exists() and self.env.is_main:
                shutil.rmtree(output_dir)  # a checkpoint of other settings must not be continued
            barrier(self.env)
            assert self.parent is not None
            summary = train(
                config,
                resume=resuming,
                progress=self.progress,
                parent_run_id=self.parent.run_id,
                dataset_prefix=self.config.name,
            )
            if summary.interrupted:
                raise _Interrupted
            return {
                "run_dir": str(output_dir),
                "checkpoint": summary.checkpoint,
                "backbone": summary.backbone,
                "model_id": summary.model_id,
                **summary.eval,
            }, summary.run_id

        result = self._stage(
            "pretrain",
            stage_fingerprint,
            lambda r: bool(r.outputs.get("backbone")) and Path(r.outputs["backbone"]).is_file(),
            run,
            every_rank=True,
        )
        self._describe_parent(convert, result.record.outputs.get("model_id"))
        return result

    def _describe_parent(self, convert: StageResult, model_id: str | None) -> None:
        """The pipeline run's own row in MLflow's runs table, where its stages are folded away: the shard
        sets it trains on (Dataset column) and the backbone its pretraining logged (Models column)."""
        from clusterssl.shards.manifest import load_manifest

        assert self.parent is not None
        if self.parent.run_id is None:
            return
        for subset, context in (("train", "training"), ("val", "evaluation")):
            if subset in convert.record.outputs:
                manifest = load_manifest(convert.record.outputs[subset]["dir"])
                self.parent.log_shard_set(manifest, self._set_name(subset), context)
        if model_id is not None:
            self.parent.link_model(model_id)

    def _set_name(self, subset: str) -> str:
        """How a shard set is named in MLflow's Dataset column: ``<pipeline>/<subset>``."""
        return f"{self.config.name}/{subset}"

    def _extract(self, pretrain: StageResult) -> StageResult:
        from clusterssl.pipeline.features.extraction import extract_checkpoint
        from clusterssl.shards.manifest import load_manifest

        section = self.config.extract
        stage_fingerprint = fingerprint(pretrain.record.fingerprint, section)
        bank_dir = self.workdir / "bank"

        def run(resuming: bool) -> tuple[dict[str, Any], str | None]:
            if not resuming and bank_dir.exists() and self.env.is_main:
                shutil.rmtree(bank_dir)
            barrier(self.env)
            child = self._child("extract")
            with tracking_run(child):
                child.log_params(
                    {
                        "checkpoint": pretrain.record.outputs["backbone"],
                        **flatten({"extract": to_dict(section)}),
                    }
                )
                bank = extract_checkpoint(
                    pretrain.record.outputs["backbone"],
                    self._train_data(),
                    bank_dir,
                    settings=self._extraction_settings(batch_size=section.batch_size),
                    dtype=section.dtype,
                    device=self.config.device,
                    progress=self.progress,
                )
                child.log_metrics({"rows": float(bank.meta.num_samples), "dim": float(bank.meta.dim)}, step=0)
                child.log_shard_set(load_manifest(self._train_data()), self._set_name("train"), "extraction")
                return {
                    "bank": str(bank_dir),
                    "rows": bank.meta.num_samples,
                    "dim": bank.meta.dim,
                }, child.run_id

        return self._stage(
            "extract",
            stage_fingerprint,
            lambda r: (Path(r.outputs.get("bank", "")) / "bank.json").is_file(),
            run,
            every_rank=True,
        )

    def _cluster(self, extract: StageResult) -> StageResult:
        from clusterssl.pipeline.features.reports import cluster_bank

        section = self.config.cluster
        stage_fingerprint = fingerprint(extract.record.fingerprint, section)
        out_dir = self.workdir / "clusters"

        def run(resuming: bool) -> tuple[dict[str, Any], str | None]:
            child = self._child("cluster")
            with tracking_run(child):
                child.log_params(
                    flatten({"cluster": to_dict(section), "bank": extract.record.outputs["bank"]})
                )
                report = cluster_bank(
                    extract.record.outputs["bank"],
                    section.k,
                    out_dir,
                    spherical=section.spherical,
                    niter=section.niter,
                    seed=section.seed,
                )
                for k, stats in report.statistics.items():
                    child.log_metrics({f"k{k}/{name}": float(value) for name, value in stats.items()}, step=0)
                for path in report.files:
                    if path.suffix == ".png":
                        child.log_artifact(path, "plots")
                outputs = {"dir": str(out_dir), "k": list(section.k)}
                outputs.update(
                    {f"k{k}_nmi": stats["nmi"] for k, stats in report.statistics.items() if "nmi" in stats}
                )
                return outputs, child.run_id

        return self._stage(
            "cluster", stage_fingerprint, lambda r: Path(r.outputs.get("dir", "")).is_dir(), run
        )

    def _evaluate(self, convert: StageResult, pretrain: StageResult) -> StageResult:
        from clusterssl.pipeline.features.evaluation import evaluate_checkpoint

        section = self.config.evaluate
        stage_fingerprint = fingerprint(pretrain.record.fingerprint, convert.record.fingerprint, section)

        def run(resuming: bool) -> tuple[dict[str, Any], str | None]:
            assert self.parent is not None
            outputs = convert.record.outputs
            summary = evaluate_checkpoint(
                pretrain.record.outputs["backbone"],
                outputs["train"]["dir"],
                outputs["val"]["dir"],
                settings=self._extraction_settings(),
                k=section.k,
                temperature=section.temperature,
                baseline=section.baseline,
                device=self.config.device,
                track=self.config.tracking.enabled,
                tracking_uri=self.config.tracking.uri,
                experiment=self.config.tracking.experiment,
                parent_run_id=self.parent.run_id,
            )
            run_id = summary.pop("run_id", None)
            baseline = summary.pop("baseline", None)
            kept = ("knn_top1", "knn_top5", "linear_top1", "nmi", "ari")
            result = {k: v for k, v in summary.items() if k in kept}
            if baseline:
                result.update({f"random_init_{k}": v for k, v in baseline.items()})
            return result, run_id

        return self._stage("evaluate", stage_fingerprint, lambda r: "knn_top1" in r.outputs, run)

    def _extraction_settings(self, **overrides: Any) -> ExtractionSettings:
        """The loader settings every extraction pass of the pipeline shares (``overrides`` per stage)."""
        from clusterssl.pipeline.features.extraction import ExtractionSettings

        return ExtractionSettings(
            backend=self.config.backend, num_workers=self.config.num_workers, **overrides
        )

    def _train_data(self) -> str:
        convert = self._read_record("convert")
        if convert is None:
            raise PipelineError("the convert stage has no record; run the pipeline from the start")
        return convert.outputs["train"]["dir"]


def run_pipeline(config: PipelineConfig, *, progress: bool = True) -> PipelineSummary:
    """Run the stages, in one process or as one rank of torchrun's (or Slurm's) world. The work directory
    is claimed for the whole run (under torchrun rank 0 takes the lock and every rank follows)."""
    from clusterssl.pipeline.train.lock import lock_directory

    env = DistributedEnv.from_environment()
    device = resolve_device(config.device, env)
    init_distributed(env, device)
    try:
        with lock_directory(
            config.workdir,
            owner="pipeline run",
            hint="choose another --set workdir=…",
            env=env,
            device=device,
        ):
            return PipelineRunner(config, progress=progress, env=env).run()
    finally:
        if env.is_distributed:
            shutdown_distributed()


def check_single_process() -> None:
    """For commands that are one process by design (the demo runs several pipelines back to back)."""
    world_size = DistributedEnv.from_environment().world_size
    if world_size > 1:
        raise PipelineError(
            f"this command runs as one process, not under torchrun (WORLD_SIZE={world_size}); run it plain, "
            "or run `clusterssl run PIPELINE.yaml` or `clusterssl train CONFIG` under torchrun"
        )
