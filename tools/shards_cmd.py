"""``clusterssl shards …``: convert, verify and describe shard sets."""

from __future__ import annotations

import click


@click.group()
def shards() -> None:
    """Turn image datasets into WebDataset shards (with DALI indexes and a manifest) and check them."""
