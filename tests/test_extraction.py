"""The index-stable extraction pass (pipeline/features/extraction.py) on real shards: the bank does not depend on
the loader layout, every row is written once, and an interrupted pass resumes to the same bank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from extraction_helpers import EVAL_SPEC, CountingModule, run_extraction, tiny_module

from clusterssl.pipeline.features.store import FeatureStore


def test_sequential_bank_rows_are_the_samples_of_their_index(
    digits16: Path, sequential_bank: FeatureStore
) -> None:
    """Row i holds the features of the image whose global index is i, read straight from the shards."""
    from clusterssl.pipeline.data.loader import build_loader

    module = tiny_module()
    module.eval()
    loader = build_loader(digits16 / "train", EVAL_SPEC, 50, backend="torch", num_workers=0, shuffle=False)
    first = next(iter(loader))
    with torch.no_grad():
        expected = module(first.views[0]).numpy()
    np.testing.assert_allclose(sequential_bank.features[first.index.numpy()], expected, rtol=1e-6, atol=1e-6)
    assert sequential_bank.meta.complete and sequential_bank.num_written == 1618
    assert (sequential_bank.labels >= 0).all()


def test_shuffled_two_worker_pass_equals_the_sequential_pass(
    digits16: Path, sequential_bank: FeatureStore
) -> None:
    shuffled = run_extraction(digits16 / "train", tiny_module(), num_workers=2, shuffle=True, batch_size=64)
    np.testing.assert_allclose(shuffled.features, sequential_bank.features, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(shuffled.labels, sequential_bank.labels)
    # The rows differ from each other, so equal banks mean every row found its sample.
    assert np.unique(sequential_bank.features.round(5), axis=0).shape[0] > 1500


def test_interrupted_then_resumed_pass_equals_an_uninterrupted_one(
    digits16: Path, sequential_bank: FeatureStore, tmp_path: Path
) -> None:
    out = tmp_path / "bank"
    source = {"module": "tiny", "manifest": "test"}
    partial = run_extraction(
        digits16 / "train", tiny_module(), num_workers=2, out_dir=out, source=source, max_batches=5
    )
    assert not partial.meta.complete and partial.num_written == 500  # five batches of 100
    on_disk = FeatureStore.open(out)
    assert on_disk.num_written == 500 and not on_disk.meta.complete

    counting = CountingModule(tiny_module())
    resumed = run_extraction(digits16 / "train", counting, num_workers=2, out_dir=out, source=source)
    # Only the 1,118 missing rows were read (12 batches of 100, the last one padded).
    assert counting.images == 1200
    assert resumed.meta.complete
    features = np.load(out / "features.npy", mmap_mode="r")
    np.testing.assert_allclose(features, sequential_bank.features, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(FeatureStore.open(out).labels, sequential_bank.labels)

    # Another producer (other module or data) never continues someone else's rows: it starts afresh.
    counting = CountingModule(tiny_module())
    run_extraction(
        digits16 / "train", counting, num_workers=0, out_dir=out, source={"module": "other"}, max_batches=1
    )
    assert counting.images == 100 and FeatureStore.open(out).num_written == 100


def test_float16_bank_matches_float32(digits16: Path, sequential_bank: FeatureStore, tmp_path: Path) -> None:
    half = run_extraction(
        digits16 / "train", tiny_module(), num_workers=0, out_dir=tmp_path / "half", dtype="float16"
    )
    stored = np.load(tmp_path / "half" / "features.npy", mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape == (1618, 8)
    np.testing.assert_allclose(stored.astype(np.float32), sequential_bank.features, rtol=2e-3, atol=2e-3)
    assert half.meta.dtype == "float16"
