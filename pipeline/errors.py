"""The error a user can cause at run time (bad config key, unreachable tracking store, missing data)."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with the user's configuration or data; the CLI prints it as one line and exits with 2."""
