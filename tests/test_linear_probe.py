"""Linear probe: accuracy known by construction; the penalty is chosen without the evaluation labels."""

from __future__ import annotations

import numpy as np
import pytest

from clusterssl.errors import PipelineError
from clusterssl.pipeline.features.linear_probe import WEIGHT_DECAYS, linear_probe


def centred_classes(
    rng: np.random.Generator, per_class: int, classes: int, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Classes around far-apart centres: linearly separable with a wide margin."""
    centres = np.eye(classes, dim) * 8.0
    labels = np.repeat(np.arange(classes), per_class)
    return (centres[labels] + rng.normal(0, 0.5, (len(labels), dim))).astype(np.float32), labels


def margin_pair(rng: np.random.Generator, count: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes split by the sign of the first feature, kept at least 1 from the boundary."""
    labels = rng.integers(0, 2, count)
    x = rng.normal(0, 1, (count, dim))
    x[:, 0] = (2 * labels - 1) * (1 + np.abs(rng.normal(0, 1, count)))
    return x.astype(np.float32), labels


def flip(labels: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """Exactly ``count`` labels changed to the other of two classes."""
    flipped = labels.copy()
    rows = rng.choice(len(labels), count, replace=False)
    flipped[rows] = 1 - flipped[rows]
    return flipped


def test_separable_classes_are_all_right() -> None:
    rng = np.random.default_rng(0)
    train = centred_classes(rng, 60, 10, 32)
    val = centred_classes(rng, 20, 10, 32)
    result = linear_probe(*train, *val)
    assert result.top1 == 1.0
    assert result.num_train == 600 and result.num_val == 200
    assert result.weight_decay in result.holdout_top1


def test_flipped_labels_give_the_known_rate() -> None:
    """Labels flipped at random cannot be predicted: with 10% of the training labels and exactly 250 of
    the 1,000 evaluation labels flipped, the probe still finds the true boundary and scores 0.75."""
    rng = np.random.default_rng(1)
    train_x, train_y = margin_pair(rng, 3000, 16)
    val_x, val_y = margin_pair(rng, 1000, 16)
    result = linear_probe(train_x, flip(train_y, rng, 300), val_x, flip(val_y, rng, 250))
    assert result.top1 == 0.75


def test_penalty_is_chosen_without_the_evaluation_labels() -> None:
    rng = np.random.default_rng(2)
    train_x, train_y = margin_pair(rng, 400, 64)
    val_x, val_y = margin_pair(rng, 200, 64)
    same_train = flip(train_y, rng, 80)
    a = linear_probe(train_x, same_train, val_x, val_y)
    b = linear_probe(train_x, same_train, val_x, 1 - val_y)
    assert a.weight_decay == b.weight_decay and a.holdout_top1 == b.holdout_top1
    tried = sorted(a.holdout_top1, reverse=True)
    assert tried == sorted(WEIGHT_DECAYS, reverse=True)[: len(tried)], "tried from the strongest down"
    assert a.top1 + b.top1 == pytest.approx(1.0)


def test_unlabelled_samples_are_left_out() -> None:
    rng = np.random.default_rng(5)
    train_x, train_y = centred_classes(rng, 30, 3, 8)
    val_x, val_y = centred_classes(rng, 10, 3, 8)
    train_y = train_y.copy()
    train_y[::3] = -1
    result = linear_probe(train_x, train_y, val_x, np.where(np.arange(30) < 5, -1, val_y))
    assert result.num_train == 60 and result.num_val == 25 and result.top1 == 1.0


def test_labels_outside_the_classes_are_refused() -> None:
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(PipelineError, match="outside the 2 classes"):
        linear_probe(x, np.array([0, 1, 0, 5]), x, np.array([0, 1, 0, 1]), num_classes=2)


def test_written_out_gradients_are_autograds() -> None:
    """The solver's loss and gradients, written out for speed, equal autograd's on cross-entropy plus
    weight_decay / 2 * |W|^2."""
    import torch
    import torch.nn.functional as F

    from clusterssl.pipeline.features.linear_probe import penalised_cross_entropy

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(50, 7, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (50,), generator=generator)
    weight = torch.randn(4, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    expected = F.cross_entropy(x @ weight.t() + bias, y) + 0.15 * weight.pow(2).sum()
    expected.backward()
    loss, weight_grad, bias_grad = penalised_cross_entropy(x, y, weight.detach(), bias.detach(), 0.3)
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(weight_grad, weight.grad)
    torch.testing.assert_close(bias_grad, bias.grad)
