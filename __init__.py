"""clusterssl: clustering-based self-supervised pretraining on sharded WebDataset streams.

The packages follow the data flow:

- ``clusterssl.shards``: image sources → WebDataset tar shards, DALI index files and a manifest;
- ``clusterssl.pipeline``: run time, by stage: ``data`` (stream and augment), ``train`` (the trainer),
  ``features`` (extraction, the feature store, clustering reports, evaluation), ``tracking`` (MLflow,
  plots), with the staged runner on top;
- ``clusterssl.models``: backbones, heads, Sinkhorn, k-means and one module per method;
- ``clusterssl.tools``: the ``clusterssl`` command line and the benchmarks.

Importing this package imports nothing heavy; the command line is ``python -m clusterssl``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clusterssl")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
