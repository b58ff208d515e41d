"""The error a user can cause in this package (bad path, empty source, tampered shard set)."""

from __future__ import annotations


class ShardsError(Exception):
    """A problem with the user's input or data; the CLI prints its message as one line and exits with 2."""
