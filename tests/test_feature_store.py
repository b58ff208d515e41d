"""The feature store's exactly-once contract and its on-disk layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clusterssl.errors import PipelineError
from clusterssl.pipeline.features.store import FeatureStore


def test_rows_land_by_index_and_survive_reopen(tmp_path: Path) -> None:
    bank = FeatureStore.create(5, 2, directory=tmp_path, source={"module": "test"})
    bank.write(np.array([3, -1, 0]), np.array([[3, 3], [9, 9], [0, 0.5]]), np.array([1, 7, 2]))
    bank.write(np.array([4, 1, 2]), np.array([[4, 4], [1, 1], [2, 2]]), np.array([0, 0, 1]))
    bank.finalize()
    features = np.load(tmp_path / "features.npy", mmap_mode="r")
    np.testing.assert_array_equal(features, [[0, 0.5], [1, 1], [2, 2], [3, 3], [4, 4]])
    reopened = FeatureStore.open(tmp_path)
    assert reopened.meta.complete and reopened.meta.source == {"module": "test"}
    np.testing.assert_array_equal(reopened.labels, [2, 0, 1, 1, 0])
    assert reopened.as_feature_bank().num_samples == 5


def test_a_row_written_twice_is_an_error() -> None:
    bank = FeatureStore.create(3, 1)
    bank.write(np.array([0, 1]), np.zeros((2, 1)))
    with pytest.raises(PipelineError, match="written twice"):
        bank.write(np.array([1]), np.zeros((1, 1)))
    with pytest.raises(PipelineError, match="written twice"):
        bank.write(np.array([2, 2]), np.zeros((2, 1)))


def test_finalize_names_missing_rows(tmp_path: Path) -> None:
    bank = FeatureStore.create(4, 1, directory=tmp_path, dtype="float16")
    bank.write(np.array([0, 2]), np.ones((2, 1)))
    with pytest.raises(PipelineError, match=r"2 of 4 rows were never written \(e.g. indices \[1, 3\]\)"):
        bank.finalize()
    bank.flush()
    reopened = FeatureStore.open(tmp_path, writable=True)
    assert reopened.features.dtype == np.float16
    np.testing.assert_array_equal(reopened.missing(), [1, 3])
