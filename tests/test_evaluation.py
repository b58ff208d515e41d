"""Weighted k-NN against a hand-worked example and a plain numpy implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clusterssl.pipeline.features.evaluation import knn_accuracy, knn_predict


def test_knn_votes_by_exp_similarity_over_temperature() -> None:
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[2.0, 0.1]])
    scores = knn_predict(train, labels, query, num_classes=2, k=2, temperature=0.5)
    q = query / query.norm()
    sims = (train / train.norm(dim=1, keepdim=True)) @ q[0]
    # the two nearest are train rows 0 (class 0) and 2 (class 1)
    expected = torch.tensor([[torch.exp(sims[0] / 0.5), torch.exp(sims[2] / 0.5)]])
    torch.testing.assert_close(scores, expected)


def test_knn_accuracy_matches_numpy_reference_and_ignores_unlabelled() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))
    train_y = rng.integers(0, 3, 200)
    train = centres[train_y] + 0.8 * rng.normal(size=(200, 8))
    query_y = rng.integers(0, 3, 50)
    query = centres[query_y] + 0.8 * rng.normal(size=(50, 8))
    query_y_with_unknown = np.concatenate([query_y, [-1]])
    query_with_unknown = np.concatenate([query, rng.normal(size=(1, 8))])

    def reference() -> float:
        tn = train / np.linalg.norm(train, axis=1, keepdims=True)
        qn = query / np.linalg.norm(query, axis=1, keepdims=True)
        sims = qn @ tn.T
        top = np.argsort(-sims, axis=1)[:, :20]
        votes = np.zeros((50, 3))
        for row in range(50):
            for j in top[row]:
                votes[row, train_y[j]] += np.exp(sims[row, j] / 0.07)
        return float((votes.argmax(1) == query_y).mean())

    result = knn_accuracy(train, train_y, query_with_unknown, query_y_with_unknown)
    assert result.num_query == 50
    assert result.top1 == pytest.approx(reference())
    assert result.top5 == 1.0


def test_a_label_outside_the_manifest_classes_is_refused_before_voting() -> None:
    """The vote table is sized by the manifest's class count: one tampered label of 10^12 used to size
    it instead (terabytes); now it is one clear error."""
    from clusterssl.errors import PipelineError
    from clusterssl.models.types import FeatureBank
    from clusterssl.pipeline.features.evaluation import evaluate_features

    rng = np.random.default_rng(1)
    train = FeatureBank(rng.normal(size=(6, 4)).astype(np.float32), np.array([0, 1, 2, 0, 1, 10**12]))
    val = FeatureBank(rng.normal(size=(4, 4)).astype(np.float32), np.array([0, 1, 2, 1]))
    with pytest.raises(PipelineError, match="label 1000000000000, outside the 3 classes"):
        evaluate_features(train, val, num_classes=3)
    with pytest.raises(PipelineError, match="query sample has label 3, outside the 3 classes"):
        knn_accuracy(
            val.features, np.array([0, 1, 2, 1]), val.features, np.array([0, 1, 2, 3]), num_classes=3
        )
