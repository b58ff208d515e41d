"""Helpers the shard tests run in a subprocess (a module, so that `python -m` and its workers can import it)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from clusterssl.shards.convert import ConvertOptions, convert
from clusterssl.shards.sources import ImageFolderSource


class SlowImageFolderSource(ImageFolderSource):
    """An ImageFolder source that takes ``delay`` seconds per read, so a test can kill a conversion
    half-way. It describes itself as a plain imagefolder: re-running with the real source resumes."""

    def __init__(self, root: str | Path, delay: float) -> None:
        super().__init__(root)
        self.delay = delay

    def read(self, ref: str) -> bytes:
        time.sleep(self.delay)
        return super().read(ref)


def slow_convert(root: str, out: str, samples_per_shard: int, workers: int, delay: float) -> None:
    convert(
        SlowImageFolderSource(root, delay),
        out,
        ConvertOptions(samples_per_shard=samples_per_shard, workers=workers),
    )


if __name__ == "__main__":
    slow_convert(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
