"""Running the ``clusterssl`` CLI in-process and reading its one-line errors, for the CLI tests."""

from __future__ import annotations

from click.testing import CliRunner, Result

from clusterssl.tools.cli import cli


def invoke(*args: str) -> Result:
    """``clusterssl ARGS…`` in this process; stdout and stderr kept apart."""
    return CliRunner().invoke(cli, list(args))


def one_error_line(result: Result) -> str:
    """The single stderr line of a user error (exit code 2); fails the test otherwise."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]
