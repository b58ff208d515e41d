"""``clusterssl bench …``: benchmarks that print a figure next to a baseline measured in the same run."""

from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Measure throughput against a baseline run on the same machine, in the same run."""
