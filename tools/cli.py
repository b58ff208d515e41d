"""The ``clusterssl`` command line.

Commands live in one module per stage (``tools/shards_cmd.py``, …) and import their heavy dependencies
(torch, DALI, mlflow) inside the command, so ``clusterssl --help`` stays instant. Errors a user can cause
are raised as ``ShardsError``/``ModelError``/``PipelineError`` anywhere below and end here as one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from clusterssl.errors import ModelError, PipelineError, ShardsError

USER_ERRORS: tuple[type[BaseException], ...] = (ShardsError, ModelError, PipelineError)
USER_ERROR_EXIT_CODE = 2


class UserError(click.ClickException):
    """A user-caused problem, shown as ``Error: <message>`` with exit code 2."""

    exit_code = USER_ERROR_EXIT_CODE


class ClusterSSLGroup(click.Group):
    """A click group that turns the packages' user errors into one line and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as error:
            raise UserError(str(error)) from None


@click.group(cls=ClusterSSLGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clusterssl")
def cli() -> None:
    """Clustering-based self-supervised pretraining on sharded WebDataset streams.

    Stages: `shards convert` → `train` → `extract` → `cluster` → `eval`, or all of them with `run`.
    """


def _register_commands() -> None:
    """Attach the stage commands (kept in their own modules to keep this file about plumbing)."""
    from clusterssl.tools import (
        bench_cmd,
        cluster_cmd,
        demo_cmd,
        eval_cmd,
        extract_cmd,
        run_cmd,
        shards_cmd,
        train_cmd,
    )

    cli.add_command(shards_cmd.shards)
    cli.add_command(train_cmd.train)
    cli.add_command(extract_cmd.extract)
    cli.add_command(cluster_cmd.cluster)
    cli.add_command(eval_cmd.eval_group)
    cli.add_command(run_cmd.run)
    cli.add_command(bench_cmd.bench)
    cli.add_command(demo_cmd.demo)


NOISY_LOGGERS = ("mlflow", "alembic", "urllib3", "matplotlib", "PIL", "faiss")


def configure_logging() -> None:
    """Our warnings and progress notes on stderr; libraries only when they have something to warn of."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # MLflow configures its own loggers when imported (inside the commands), from this variable
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="clusterssl")


if __name__ == "__main__":
    # `python -m clusterssl.tools.cli`: this file runs as __main__ and the command modules import
    # `clusterssl.tools.cli`, a second copy. Registering in this copy too would import them half-initialised,
    # so run the importable module's CLI instead (worker processes re-import this file as __mp_main__: same
    # rule). `python -m clusterssl` goes through clusterssl/__main__.py and never gets here.
    from clusterssl.tools.cli import main as _importable_main

    _importable_main()
elif __name__ == "clusterssl.tools.cli":
    _register_commands()
