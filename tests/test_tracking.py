"""MLflow tracking: a store that fails mid-run is reported once and training goes on; rank > 0 logs nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from clusterssl.errors import PipelineError
from clusterssl.pipeline.tracking.runs import MlflowTracker, NullTracker, TrackingConfig, open_tracker


class FlakyClient:
    """Accepts calls until ``fail_after`` of them, then raises like an unreachable server."""

    def __init__(self, fail_after: int) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def _call(self, *args: object, **kwargs: object) -> None:
        self.calls += 1
        if self.calls > self.fail_after:
            raise ConnectionError("HTTPConnectionPool(host='tracking', port=5000): Max retries exceeded")

    log_batch = log_artifact = log_text = set_terminated = _call


def test_a_failing_store_is_reported_once_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    client = FlakyClient(fail_after=2)
    tracker = MlflowTracker(client, "run", "http://tracking:5000", system_metrics=False, experiment_id="0")
    with caplog.at_level(logging.WARNING, logger="clusterssl.pipeline.tracking.runs"):
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 1.0}, step=0)
        for step in range(1, 5):
            tracker.log_metrics({"loss": 1.0}, step=step)
        tracker.log_artifact(Path("x"))
        tracker.close()
    warnings = [r for r in caplog.records if "tracking failed" in r.getMessage()]
    assert len(warnings) == 1 and "training continues" in warnings[0].getMessage()
    assert client.calls == 5, "after the first failure nothing is sent but the tag and the run's end"
    assert tracker.error is not None and tracker.error.startswith("logging metrics failed (ConnectionError")


def test_other_ranks_and_disabled_tracking_get_a_null_tracker() -> None:
    assert isinstance(open_tracker(TrackingConfig(), run_name="x", rank=1), NullTracker)
    assert isinstance(open_tracker(TrackingConfig(enabled=False), run_name="x"), NullTracker)


def test_unreachable_store_at_start_is_one_clear_error() -> None:
    with pytest.raises(
        PipelineError, match=r"cannot reach the MLflow tracking store at http://127.0.0.1:9 .*--no-track"
    ):
        open_tracker(TrackingConfig(uri="http://127.0.0.1:9", system_metrics=False), run_name="x")


def test_resumed_run_logs_into_the_same_mlflow_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    config = TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}", system_metrics=False)
    first = open_tracker(config, run_name="x")
    run_id = first.run_id
    first.log_metrics({"loss": 2.0}, step=0)
    first.close("KILLED")
    again = open_tracker(config, run_name="x", run_id=run_id)
    assert again.run_id == run_id
    again.log_metrics({"loss": 1.0}, step=1)
    again.close()
    client = MlflowClient(config.uri)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [2.0, 1.0]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_last_steps_are_where_each_metric_series_ends_in_the_store(tmp_path: Path) -> None:
    config = TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}", system_metrics=False)
    tracker = open_tracker(config, run_name="x")
    assert tracker.last_steps() == {}
    tracker.log_metrics({"loss": 3.0, "lr": 0.1}, step=4)
    tracker.log_metrics({"loss": 2.0}, step=9)
    tracker.log_metrics({"knn/top1": 0.5}, step=7)
    tracker.log_metrics({"system/cpu_utilization_percentage": 50.0}, step=30)
    assert tracker.last_steps() == {"loss": 9, "lr": 4, "knn/top1": 7}
    assert NullTracker().last_steps() == {}
    tracker.close()


class ClosingTracker(NullTracker):
    """Records the status each close() was given."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    def close(self, status: str = "FINISHED") -> None:
        self.closed.append(status)


def test_tracking_run_closes_with_the_outcome_of_its_body() -> None:
    from clusterssl.pipeline.tracking.runs import tracking_run

    finished, stopped, failed, interrupted = (ClosingTracker() for _ in range(4))
    with tracking_run(finished):
        pass
    with tracking_run(stopped) as outcome:
        outcome.status = "KILLED"  # what the trainer sets after checkpointing on SIGTERM/SIGINT
    with pytest.raises(ValueError), tracking_run(failed):
        raise ValueError
    with pytest.raises(KeyboardInterrupt), tracking_run(interrupted):
        raise KeyboardInterrupt
    assert [t.closed for t in (finished, stopped, failed, interrupted)] == [
        ["FINISHED"],
        ["KILLED"],
        ["FAILED"],
        ["KILLED"],
    ]
