"""The error a user can cause in this package (unknown name, bad setting, k larger than the data)."""

from __future__ import annotations


class ModelError(Exception):
    """A problem with the user's configuration or data; the CLI prints it as one line and exits with 2."""
