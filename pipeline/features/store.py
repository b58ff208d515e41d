"""FeatureStore: an N×D feature array on disk, row i for global sample index i, written exactly once.

Layout of a bank directory:
    features.npy  (N, D) float32 or float16, an .npy file (``numpy.load(path, mmap_mode="r")`` reads it)
    labels.npy    (N,) int64 class ids (-1 unknown)
    written.npy   (N,) bool: which rows hold data (flushed after the rows themselves, so a crash never
                  marks a row written whose data is lost)
    bank.json     metadata: N, D, dtype, complete, and what produced it (checkpoint, manifest hash, …)

Writers call ``write(indices, features, labels)`` in any order from any worker or rank; writing a row
twice is an error (the exactly-once guarantee is checked, not assumed). ``finalize()`` checks that
every row was written.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clusterssl.errors import PipelineError
from clusterssl.models.types import FeatureBank

FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
WRITTEN_FILE = "written.npy"
META_FILE = "bank.json"
DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class FeatureStoreMeta:
    num_samples: int
    dim: int
    dtype: str = "float32"
    complete: bool = False
    source: dict[str, Any] = field(default_factory=dict)
    """What the rows are features of: checkpoint path/hash, module name, manifest hash, view spec."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class FeatureStore:
    """An N×D bank on disk (``directory`` given) or in memory (``directory=None``)."""

    def __init__(
        self,
        meta: FeatureStoreMeta,
        features: np.ndarray,
        labels: np.ndarray,
        written: np.ndarray,
        directory: Path | None,
    ) -> None:
        self.meta = meta
        self.features = features
        self.labels = labels
        self.written = written
        self.directory = directory
        self.rows_resumed = 0
        """Rows already written when the extraction pass that returned this bank began (a continued bank)."""

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        num_samples: int,
        dim: int,
        *,
        directory: str | Path | None = None,
        dtype: str = "float32",
        source: dict[str, Any] | None = None,
    ) -> FeatureStore:
        if num_samples <= 0:
            raise PipelineError("cannot create a feature store for an empty dataset")
        if dtype not in DTYPES:
            raise PipelineError(f"unknown bank dtype {dtype!r}; known: {', '.join(DTYPES)}")
        meta = FeatureStoreMeta(num_samples=num_samples, dim=dim, dtype=dtype, source=dict(source or {}))
        labels = np.full(num_samples, -1, dtype=np.int64)
        written = np.zeros(num_samples, dtype=bool)
        if directory is None:
            features = np.zeros((num_samples, dim), dtype=DTYPES[dtype])
            return cls(meta, features, labels, written, None)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        features = np.lib.format.open_memmap(
            directory / FEATURES_FILE, mode="w+", dtype=DTYPES[dtype], shape=(num_samples, dim)
        )
        bank = cls(meta, features, labels, written, directory)
        bank.flush()
        return bank

    @classmethod
    def without_rows(cls, num_samples: int, dim: int, *, dtype: str = "float32") -> FeatureStore:
        """What an extraction pass returns on a rank other than 0 under DDP, where the rows were gathered
        to rank 0: the bank's shape in ``meta`` ((N, D), complete), but (N, 0) features and no labels."""
        meta = FeatureStoreMeta(num_samples=num_samples, dim=dim, dtype=dtype, complete=True)
        features = np.empty((num_samples, 0), dtype=DTYPES[dtype])
        return cls(meta, features, np.empty(0, dtype=np.int64), np.empty(0, dtype=bool), None)

    @classmethod
    def open(cls, directory: str | Path, *, writable: bool = False) -> FeatureStore:
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise PipelineError(f"no feature store at {directory}: {meta_path.name} is missing")
        try:
            meta = FeatureStoreMeta(**json.loads(meta_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as error:
            raise PipelineError(f"cannot read the feature store at {directory}: {error}") from None
        if meta.num_samples == 0 or meta.dim == 0:
            raise PipelineError(
                f"the feature store at {directory} is empty ({meta.num_samples} × {meta.dim})"
            )
        try:
            features = np.load(directory / FEATURES_FILE, mmap_mode="r+" if writable else "r")
            labels = np.load(directory / LABELS_FILE)
            written = np.load(directory / WRITTEN_FILE)
        except (OSError, ValueError, TypeError) as error:
            raise PipelineError(f"cannot read the feature store at {directory}: {error}") from None
        if features.shape != (meta.num_samples, meta.dim):
            raise PipelineError(
                f"feature store {directory} is inconsistent: features {features.shape} vs {meta}"
            )
        return cls(meta, features, labels, written, directory)

    # -- writing ------------------------------------------------------------------------------------
    def write(self, indices: np.ndarray, features: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Store rows ``features[j]`` at ``indices[j]``; each index may be written once only.

        indices (B,) int, features (B, D), labels (B,) or None. Negative indices (padding) are ignored.
        """
        indices = np.asarray(indices, dtype=np.int64)
        keep = indices >= 0
        indices = indices[keep]
        if indices.size == 0:
            return
        if indices.max() >= self.meta.num_samples:
            raise PipelineError(
                f"sample index {int(indices.max())} is outside the bank (N={self.meta.num_samples})"
            )
        duplicates = indices[self.written[indices]]
        if duplicates.size or np.unique(indices).size != indices.size:
            shown = duplicates[:5].tolist() or indices[:5].tolist()
            raise PipelineError(
                f"feature store rows written twice (e.g. indices {shown}): the sample split is broken"
            )
        self.features[indices] = np.asarray(features)[keep].astype(self.features.dtype, copy=False)
        if labels is not None:
            self.labels[indices] = np.asarray(labels, dtype=np.int64)[keep]
        self.written[indices] = True

    def flush(self) -> None:
        """Persist rows, then labels and the written-bitmap, then the metadata (crash-safe order)."""
        if self.directory is None:
            return
        if isinstance(self.features, np.memmap):
            self.features.flush()
        for name, array in ((LABELS_FILE, self.labels), (WRITTEN_FILE, self.written)):
            buffer = _npy_bytes(array)
            _atomic_write_bytes(self.directory / name, buffer)
        _atomic_write_bytes(self.directory / META_FILE, json.dumps(asdict(self.meta), indent=1).encode())

    @property
    def num_written(self) -> int:
        return int(self.written.sum())

    def missing(self) -> np.ndarray:
        return np.flatnonzero(~self.written)

    def finalize(self) -> None:
        """Check that every row was written exactly once, mark the bank complete and flush it."""
        missing = self.missing()
        if missing.size:
            raise PipelineError(
                f"feature store incomplete: {missing.size} of {self.meta.num_samples} rows were never written "
                f"(e.g. indices {missing[:5].tolist()})"
            )
        self.meta.complete = True
        self.flush()

    @property
    def holds_rows(self) -> bool:
        """False for ``without_rows``' bank (a rank other than 0 under DDP)."""
        return self.features.shape[1] == self.meta.dim

    def as_feature_bank(self) -> FeatureBank:
        if not self.holds_rows:
            return FeatureBank.without_rows(self.meta.num_samples)
        has_labels = bool((self.labels >= 0).any())
        return FeatureBank(features=self.features, labels=self.labels if has_labels else None)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
