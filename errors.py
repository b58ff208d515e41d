"""The errors a user can cause, one hierarchy for the whole project.

Every class here means "the user's input, configuration or data is wrong", never a bug: the CLI prints the
message as one line and exits with code 2. The subclasses say which stage refused (useful to callers that
embed the library); catching ``ClusterSSLError`` catches them all.
"""

from __future__ import annotations


class ClusterSSLError(Exception):
    """A problem with the user's input, configuration or data; printed as one line, exit code 2."""


class ShardsError(ClusterSSLError):
    """Converting, reading or verifying a shard set failed on the user's data (bad path, tampered set)."""


class ModelError(ClusterSSLError):
    """A model or method cannot be built or run as asked (unknown name, bad setting, k larger than the data)."""


class ConfigError(ModelError):
    """A configuration key or value the user got wrong (unknown key, wrong type)."""


class PipelineError(ClusterSSLError):
    """A run-time problem the user can fix (missing data, unreachable tracking store, busy output directory)."""
