"""What several commands share, defined once so that their names, defaults and help agree: the ``--json``
option and ``emit`` (every command's final summary), and common click options. Command modules import them
from here, not from ``clusterssl.tools.cli``, which imports the command modules itself.

Extraction options (`clusterssl extract`, `clusterssl eval knn`, `clusterssl bench extract`) become a
``clusterssl.pipeline.features.extraction.ExtractionSettings``; their defaults are that class's (tests check both agree).
Tracking options (`train`, `run`, `eval knn`) become overrides of a config's ``tracking`` section. Crop sides serve the benchmarks
that build a multi-crop preset (`bench loader`, `bench train`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

Command = TypeVar("Command", bound=Callable[..., Any])


def emit(summary: Mapping[str, Any], as_json: bool, human: Callable[[Mapping[str, Any]], str]) -> None:
    """Print a command's final summary: one JSON object with ``--json``, else the human-readable text."""
    if as_json:
        click.echo(json.dumps(summary, indent=None, sort_keys=True, default=str))
    else:
        click.echo(human(summary))


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the final summary as one JSON object."
)

backend_option = click.option(
    "--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto", show_default=True
)
batch_size_option = click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto (GPU when available), cpu or cuda."
)


def num_workers_option(help: str | None = None) -> Callable[[Command], Command]:
    """--num-workers (default 2); ``help`` says what the count should match for this command."""
    return click.option("--num-workers", type=click.IntRange(min=0), default=2, show_default=True, help=help)


def crop_size_options(command: Command) -> Command:
    """--global-size and --local-size: the multi-crop sides of the benchmarks that build a preset's views."""
    command = click.option(
        "--local-size", type=click.IntRange(min=1), default=96, show_default=True, help="Local crop side."
    )(command)
    return click.option(
        "--global-size", type=click.IntRange(min=1), default=224, show_default=True, help="Global crop side."
    )(command)


def tracking_options(command: Command) -> Command:
    """--no-track, --tracking-uri and --experiment, shared by every command that logs to MLflow."""
    command = click.option(
        "--experiment", help="MLflow experiment name (default: the config's tracking.experiment)."
    )(command)
    command = click.option(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).",
    )(command)
    return click.option("--no-track", is_flag=True, help="Run without MLflow tracking.")(command)


def tracking_overrides(no_track: bool, tracking_uri: str | None, experiment: str | None) -> list[str]:
    """The tracking options of every command, as --set overrides of the tracking section."""
    overrides = []
    if no_track:
        overrides.append("tracking.enabled=false")
    if tracking_uri:
        overrides.append(f"tracking.uri={tracking_uri}")
    if experiment:
        overrides.append(f"tracking.experiment={experiment}")
    return overrides
