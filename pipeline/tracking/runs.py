"""MLflow tracking: one run per stage, nested under a pipeline run, written by rank 0 only.

The trainer talks to a ``Tracker``; ``MlflowTracker`` writes to any MLflow store through an explicit
``MlflowClient`` (no fluent global run stack), ``NullTracker`` swallows everything (``--no-track`` and
ranks other than 0). If the store cannot be reached at start the user gets one clear line; if it fails
mid-run, training goes on, the failure is reported once, and the run is still ended (FINISHED, FAILED or
KILLED) with the failure as its ``tracking_error`` tag, so no run stays RUNNING in the UI.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from clusterssl.errors import PipelineError

if TYPE_CHECKING:
    import torch

    from clusterssl.shards.manifest import Manifest

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_ROOT = "./mlruns"
_MAX_PARAM_LENGTH = 6000
_MAX_PARAMS_PER_CALL = 100
_MAX_METRICS_PER_CALL = 1000
ERROR_TAG = "tracking_error"
"""The tag that marks a run whose record stopped early, with the reason."""
SYSTEM_METRIC_PREFIX = "system/"
"""MLflow's own prefix for the utilisation metrics its monitor logs."""


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log the run to MLflow. False (or --no-track) runs without a tracking store."""
    uri: str | None = None
    """Tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    experiment: str = "clusterssl"
    """MLflow experiment name; created on first use."""
    run_name: str | None = None
    """Name shown in the MLflow UI; default: <method>-<backbone>."""
    system_metrics: bool = True
    """Log CPU/memory/GPU utilisation every few seconds as system/* metrics."""


class Tracker(Protocol):
    run_id: str | None
    experiment_id: str | None
    tracking_uri: str | None
    """The store the run is logged to (None when nothing is tracked)."""
    error: str | None
    """Why tracking stopped mid-run (None while it works): the run's record is incomplete."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def last_steps(self) -> dict[str, int]:
        """Each metric the run holds, with the highest step logged for it (system metrics left out)."""
        ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_shard_set(self, manifest: Manifest, name: str, context: str) -> None: ...
    def log_model(self, module: torch.nn.Module, name: str) -> str | None:
        """Log ``module`` as an MLflow model of the run; its model id (None when nothing was logged)."""
        ...

    def link_model(self, model_id: str) -> None:
        """Record a model logged by another run (a pipeline stage's) as an output of this one."""
        ...

    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracks nothing: for --no-track and for every rank but 0."""

    run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None
    error: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def last_steps(self) -> dict[str, int]:
        return {}

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_shard_set(self, manifest: Manifest, name: str, context: str) -> None:
        pass

    def log_model(self, module: torch.nn.Module, name: str) -> str | None:
        return None

    def link_model(self, model_id: str) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def resolve_tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


LOCAL_UI = "http://127.0.0.1:5000"
"""Where ``mlflow ui`` serves by default."""


def ui_hint(uri: str, experiment_id: str | None = None) -> str:
    """How to look at the runs in ``uri``: open a tracking server's address, or serve a local store,
    with the address of the experiment's runs table when ``experiment_id`` is known."""
    if uri.startswith(("http://", "https://")):
        return f"open {runs_page(uri.rstrip('/'), experiment_id)}"
    serve = f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
    return serve if experiment_id is None else f"{serve}, then open {runs_page(LOCAL_UI, experiment_id)}"


def runs_page(ui: str, experiment_id: str | None) -> str:
    """The address of an experiment's runs table. MLflow 3's UI opens a bare experiment address on its
    GenAI overview (its default workflow, whatever the experiment holds); the ``/runs`` path opens the
    runs table with its Dataset and Models columns."""
    return ui if experiment_id is None else f"{ui}/#/experiments/{experiment_id}/runs"


def _limit_http_retries() -> None:
    """Make an unreachable server fail in seconds, not after minutes of back-off (user settings win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class MlflowTracker:
    """Logs one MLflow run. Every call after a failure is dropped; the failure is reported once."""

    def __init__(
        self, client: Any, run_id: str, tracking_uri: str, system_metrics: bool, experiment_id: str
    ) -> None:
        self._client = client
        self.run_id: str | None = run_id
        self.experiment_id: str | None = experiment_id
        self.tracking_uri: str | None = tracking_uri
        self.error: str | None = None
        self._monitor = self._start_system_metrics() if system_metrics else None

    def _start_system_metrics(self) -> Any:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, tracking_uri=self.tracking_uri)
            monitor.start()
            return monitor
        except Exception as error:  # psutil missing, or the monitor cannot start: not worth failing a run
            log.warning("MLflow system metrics are off: %s", error)
            return None

    def _guard(self, what: str, action: Any) -> None:
        if self.error is not None:
            return
        try:
            action()
        except Exception as error:
            self.error = f"{what} failed ({type(error).__name__}: {_short(str(error))})"
            log.warning(
                "MLflow tracking failed while %s (%s: %s); training continues without tracking",
                what,
                type(error).__name__,
                _short(str(error)),
            )

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), _MAX_PARAMS_PER_CALL):
            chunk = items[start : start + _MAX_PARAMS_PER_CALL]
            self._guard("logging parameters", lambda c=chunk: self._client.log_batch(self.run_id, params=c))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        for start in range(0, len(items), _MAX_METRICS_PER_CALL):
            chunk = items[start : start + _MAX_METRICS_PER_CALL]
            self._guard("logging metrics", lambda c=chunk: self._client.log_batch(self.run_id, metrics=c))

    def last_steps(self) -> dict[str, int]:
        """Read from the store itself: the step a killed run last sent may have reached MLflow without
        reaching the run's own ``metrics.jsonl``, so only the store knows where its series end."""
        found: dict[str, int] = {}

        def read() -> None:
            for key in self._client.get_run(self.run_id).data.metrics:
                if key.startswith(SYSTEM_METRIC_PREFIX):
                    continue
                history = self._client.get_metric_history(self.run_id, key)
                found[key] = max((point.step for point in history), default=-1)

        self._guard("reading the run's metrics", read)
        return found

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._guard("setting tags", lambda: self._client.log_batch(self.run_id, tags=items))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guard(
            f"uploading {Path(path).name}",
            lambda: self._client.log_artifact(self.run_id, str(path), artifact_path),
        )

    def log_text(self, text: str, artifact_file: str) -> None:
        self._guard(
            f"uploading {artifact_file}", lambda: self._client.log_text(self.run_id, text, artifact_file)
        )

    def log_shard_set(self, manifest: Manifest, name: str, context: str) -> None:
        """The shard set as a dataset input of the run (the runs table's Dataset column)."""
        from clusterssl.pipeline.tracking.logged import shard_set_input

        dataset = shard_set_input(manifest, name, context)
        self._guard(
            f"logging dataset {name}", lambda: self._client.log_inputs(self.run_id, datasets=[dataset])
        )

    def log_model(self, module: torch.nn.Module, name: str) -> str | None:
        """``module`` with MLflow's PyTorch flavour, loadable from ``runs:/<run id>/<name>``."""
        from clusterssl.pipeline.tracking.logged import log_pytorch_model

        assert self.run_id is not None and self.tracking_uri is not None
        run_id, uri = self.run_id, self.tracking_uri
        logged: list[str] = []
        self._guard(
            f"logging model {name}",
            lambda: logged.append(log_pytorch_model(self._client, run_id, uri, module, name)),
        )
        return logged[0] if logged else None

    def link_model(self, model_id: str) -> None:
        from mlflow.entities import LoggedModelOutput

        self._guard(
            f"linking model {model_id}",
            lambda: self._client.log_outputs(self.run_id, [LoggedModelOutput(model_id, step=0)]),
        )

    def close(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as error:
                log.warning("stopping MLflow system metrics failed: %s", error)
            self._monitor = None
        if self.run_id is not None:
            self._end_run(self.run_id, status)
        self.run_id = None

    def _end_run(self, run_id: str, status: str) -> None:
        """End the run even after a failure switched logging off (an artifact store that refused an upload
        can leave the tracking store itself working), tagged with that failure."""
        from mlflow.entities import RunTag

        if self.error is None:
            self._guard("closing the run", lambda: self._client.set_terminated(run_id, status))
            return
        for what, action in (
            ("tagging the run", lambda: self._client.log_batch(run_id, tags=[RunTag(ERROR_TAG, self.error)])),
            ("ending the run", lambda: self._client.set_terminated(run_id, status)),
        ):
            try:
                action()
            except Exception as error:
                log.warning("MLflow tracking: %s %s failed too (%s)", what, run_id, _short(str(error)))


def open_tracker(
    config: TrackingConfig,
    *,
    run_name: str,
    rank: int = 0,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Tracker:
    """Start a run (rank 0 only; other ranks and ``enabled=False`` get a NullTracker).

    ``run_id`` continues an existing run (a resumed training logs into the run it started in).

    Raises PipelineError with one line when the store cannot be reached, so the user can fix the URI or
    pass --no-track before any work is done.
    """
    if not config.enabled or rank != 0:
        return NullTracker()
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    from clusterssl.pipeline.tracking.logged import mark_model_training

    _limit_http_retries()
    uri = resolve_tracking_uri(config.uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        if run_id is not None and (resumed_in := _reopen(client, run_id)) is not None:
            return MlflowTracker(client, run_id, uri, config.system_metrics, resumed_in)
        experiment = client.get_experiment_by_name(config.experiment)
        if experiment is None:
            artifact_location = _default_artifact_location(uri, config.experiment)
            experiment_id = client.create_experiment(config.experiment, artifact_location=artifact_location)
        else:
            experiment_id = experiment.experiment_id
        mark_model_training(client, experiment_id)
        run_tags = {MLFLOW_RUN_NAME: config.run_name or run_name, **(tags or {})}
        if parent_run_id:
            run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = client.create_run(experiment_id, tags=run_tags, run_name=config.run_name or run_name)
    except Exception as error:
        message = _short(str(error)) or type(error).__name__
        raise PipelineError(
            f"cannot reach the MLflow tracking store at {uri} ({message}); fix the URI or run with --no-track"
        ) from None
    return MlflowTracker(client, run.info.run_id, uri, config.system_metrics, experiment_id)


def _reopen(client: Any, run_id: str) -> str | None:
    """Mark an existing run as running again and return its experiment id; None when the store does
    not know it."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        log.warning("MLflow run %s is not in this store; starting a new run", run_id)
        return None
    client.update_run(run_id, status="RUNNING")
    return str(run.info.experiment_id)


def _short(message: str, limit: int = 160) -> str:
    """The first line of an error message, cut to a readable length."""
    first = message.splitlines()[0] if message else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _default_artifact_location(uri: str, experiment: str) -> str | None:
    """For the local SQLite default, keep artifacts under ./mlruns beside the database (MLflow 3's layout)."""
    if uri.startswith("sqlite:///"):
        db_path = Path(uri.removeprefix("sqlite:///"))
        return (db_path.resolve().parent / "mlruns").as_uri()
    return None


@dataclass
class RunOutcome:
    """How ``tracking_run`` closes a run whose body returns normally."""

    status: str = "FINISHED"
    """FINISHED, or KILLED for a run that stopped early on a signal (after checkpointing)."""


@contextmanager
def tracking_run(tracker: Tracker) -> Iterator[RunOutcome]:
    """Close the run as the body's outcome says (FINISHED unless it sets KILLED), or FAILED/KILLED when
    the body raises."""
    outcome = RunOutcome()
    try:
        yield outcome
    except KeyboardInterrupt:
        tracker.close("KILLED")
        raise
    except BaseException:
        tracker.close("FAILED")
        raise
    else:
        tracker.close(outcome.status)


def git_commit(cwd: str | Path | None = None) -> str:
    """The commit of the code being run, or 'unknown' outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
