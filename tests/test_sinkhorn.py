"""Sinkhorn-Knopp: a hand-worked case, the marginals, and equality with a float64 transcription of SwAV's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clusterssl.models.sinkhorn import sinkhorn


def reference_sinkhorn(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """SwAV's Sinkhorn-Knopp (Caron et al., 2020), step by step, in float64 with explicit loops and no stabiliser."""
    q = np.exp(scores.astype(np.float64) / epsilon).T  # K × B
    num_prototypes, batch = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        for k in range(num_prototypes):
            q[k, :] = q[k, :] / q[k, :].sum() / num_prototypes
        for b in range(batch):
            q[:, b] = q[:, b] / q[:, b].sum() / batch
    return (q * batch).T


def cosine_scores(batch: int, prototypes: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """(batch, prototypes) similarities of unit vectors, as SwAV feeds to Sinkhorn."""
    generator = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    c = F.normalize(torch.randn(prototypes, dim, generator=generator), dim=1)
    return z @ c.t()


def test_two_by_two_case_worked_by_hand() -> None:
    # Choose scores so that Q = exp(s/ε)ᵀ = [[1, 2], [3, 4]] (rows: prototypes, columns: samples).
    # Total 10 → [[.1, .2], [.3, .4]]. Rows /sum /K: [[1/6, 1/3], [3/14, 2/7]].
    # Column sums 8/21 and 13/21; columns /sum /B: [[7/32, 7/26], [9/32, 6/26]]; ×B and transpose:
    epsilon = 0.5
    scores = epsilon * torch.log(torch.tensor([[1.0, 3.0], [2.0, 4.0]]))
    expected = torch.tensor([[7 / 16, 9 / 16], [7 / 13, 6 / 13]])
    torch.testing.assert_close(sinkhorn(scores, epsilon=epsilon, iterations=1), expected)


@pytest.mark.parametrize(
    ("batch", "prototypes", "epsilon", "iterations"), [(64, 10, 0.05, 3), (7, 30, 0.1, 5)]
)
def test_equals_float64_reference(batch: int, prototypes: int, epsilon: float, iterations: int) -> None:
    scores = cosine_scores(batch, prototypes)
    expected = reference_sinkhorn(scores.numpy(), epsilon, iterations)
    codes = sinkhorn(scores, epsilon=epsilon, iterations=iterations)
    assert codes.dtype == torch.float32 and codes.shape == (batch, prototypes)
    np.testing.assert_allclose(codes.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_rows_are_distributions_and_prototype_mass_converges_to_b_over_k() -> None:
    batch, prototypes = 64, 10
    scores = cosine_scores(batch, prototypes, seed=1)
    deviations = []
    for iterations in (1, 3, 10, 50):
        codes = sinkhorn(scores, epsilon=0.05, iterations=iterations)
        assert (codes >= 0).all()
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(batch))
        mass = codes.sum(dim=0)
        deviations.append((mass / (batch / prototypes) - 1).abs().max().item())
    # Every round moves the prototype marginal closer to B/K; after 50 it is there.
    assert deviations == sorted(deviations, reverse=True) and deviations[0] > 0.1
    assert deviations[-1] < 1e-3


def test_three_iterations_balance_mildly_peaked_scores() -> None:
    # With ε = 0.5 the scores are far from one-hot and 3 rounds already give B/K within 2 %.
    batch, prototypes = 128, 8
    codes = sinkhorn(cosine_scores(batch, prototypes, seed=2), epsilon=0.5, iterations=3)
    torch.testing.assert_close(
        codes.sum(dim=0), torch.full((prototypes,), batch / prototypes), rtol=0.02, atol=0
    )


def test_small_epsilon_stays_finite_thanks_to_the_per_prototype_shift() -> None:
    epsilon = 0.01
    scores = cosine_scores(16, 5, seed=3)
    scores = scores / scores.max()  # the largest score is exactly 1
    assert torch.isinf(torch.exp(scores / epsilon)).any()  # unshifted, e^100 overflows float32
    codes = sinkhorn(scores, epsilon=epsilon, iterations=3)
    assert torch.isfinite(codes).all()
    expected = reference_sinkhorn(scores.numpy(), epsilon, 3)
    np.testing.assert_allclose(codes.numpy(), expected, rtol=1e-3, atol=1e-6)


def test_a_prototype_far_from_every_sample_keeps_its_share() -> None:
    # Prototype 2 scores -1 against every sample. Shifted by the one global maximum (1), its row would be
    # e^(-2/0.015) = e^-133 = 0 in float32 and its row normalisation 0/0; shifted by its own maximum it is
    # exactly as in float64, and Sinkhorn still hands it its share of the mass.
    epsilon = 0.015
    scores = torch.tensor([[1.0, 0.2, -1.0], [0.3, 1.0, -1.0], [0.9, 0.1, -1.0], [0.0, 0.8, -1.0]])
    assert torch.exp((scores[:, 2] - scores.max()) / epsilon).sum() == 0
    codes = sinkhorn(scores, epsilon=epsilon, iterations=3)
    np.testing.assert_allclose(
        codes.numpy(), reference_sinkhorn(scores.numpy(), epsilon, 3), rtol=1e-5, atol=1e-7
    )
    assert codes[:, 2].sum() > 0.5  # about B/K = 4/3 after more rounds


def test_runs_in_float32_for_low_precision_inputs_and_under_autocast() -> None:
    scores = cosine_scores(32, 6, seed=4).to(torch.bfloat16)
    expected = reference_sinkhorn(scores.float().numpy(), 0.05, 3)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        codes = sinkhorn(scores)
    assert codes.dtype == torch.float32
    np.testing.assert_allclose(codes.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_no_gradient_flows_through_the_codes() -> None:
    scores = cosine_scores(8, 4).requires_grad_(True)
    codes = sinkhorn(scores)
    assert not codes.requires_grad


def test_rejects_non_matrix_scores() -> None:
    with pytest.raises(ValueError, match="batch, prototypes"):
        sinkhorn(torch.zeros(2, 3, 4))
