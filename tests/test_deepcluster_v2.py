"""DeepCluster-v2 (models/deepcluster_v2.py): feature store by index, prototypes = normalised centroids
without gradient, the multi-crop loss against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import FakeContext, TinyBackbone, optimizer_step
from sklearn.metrics import normalized_mutual_info_score

from clusterssl.errors import ModelError
from clusterssl.models.clustering import kmeans
from clusterssl.models.deepcluster import IGNORE_LABEL
from clusterssl.models.deepcluster_v2 import DeepClusterV2, DeepClusterV2Config, deepcluster_v2_loss
from clusterssl.models.types import Batch

NUM_SAMPLES = 40


def _ready_method(seed: int = 0) -> tuple[DeepClusterV2, FakeContext]:
    """A DeepClusterV2 (two heads, k = 4 and 6) after its memory pass and first clustering."""
    torch.manual_seed(seed)
    cfg = DeepClusterV2Config(hidden_dim=16, feat_dim=5, num_prototypes=(4, 6), temperature=0.1)
    method = DeepClusterV2(TinyBackbone(num_features=8), cfg)
    images = torch.randn(NUM_SAMPLES, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    ctx = FakeContext(num_samples=NUM_SAMPLES, images=images, labels=torch.arange(NUM_SAMPLES) % 4)
    method.on_train_start(ctx)
    method.on_epoch_start(ctx)
    return method, ctx


def _batch(images: torch.Tensor, index: torch.Tensor, seed: int = 1) -> Batch:
    """Two 8-px 'global' views and one 4-px 'local' view of the images at ``index`` (noise added)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.where(index >= 0, index, torch.zeros_like(index))
    base = images[rows]
    views = [
        base + 0.1 * torch.randn(base.shape, generator=generator),
        base + 0.1 * torch.randn(base.shape, generator=generator),
        F.avg_pool2d(base, 2),
    ]
    return Batch(views=views, labels=None, index=index, num_global=2)


def test_memory_pass_fills_every_assign_view_with_the_unit_projections_by_index() -> None:
    method, ctx = _ready_method()
    assert ctx.extracted == ["projection"]
    method.eval()
    with torch.no_grad():
        expected = F.normalize(method.projection(method.backbone(ctx.images)), dim=1)
    assert method.memory.shape == (2, NUM_SAMPLES, 5)
    torch.testing.assert_close(method.memory[0], expected)
    torch.testing.assert_close(method.memory[1], expected)
    assert bool(method.memory_filled)


def test_prototypes_are_the_normalised_spherical_centroids_and_assignments_by_index() -> None:
    method, ctx = _ready_method()
    for head, k in enumerate((4, 6)):
        bank = method.memory[head % 2].numpy()
        expected = kmeans(bank, k, niter=10, seed=1000 * 0 + head, spherical=True)
        torch.testing.assert_close(
            method.prototypes[head], F.normalize(torch.from_numpy(expected.centroids), dim=1)
        )
        np.testing.assert_allclose(method.prototypes[head].norm(dim=1).numpy(), 1.0, rtol=1e-6)
        np.testing.assert_array_equal(method.assignments[head].numpy(), expected.assignments)
        logged = ctx.logged[-1]
        assert logged[f"clustering/head{head}/k"] == k
        assert logged[f"clustering/head{head}/nmi"] == pytest.approx(
            normalized_mutual_info_score(np.arange(NUM_SAMPLES) % 4, expected.assignments)
        )


def test_prototypes_get_no_gradient_and_do_not_move_in_a_step() -> None:
    method, ctx = _ready_method()
    assert ctx.images is not None
    parameters = {id(p) for p in method.parameters()}
    assert all(id(prototype) not in parameters for prototype in method.prototypes)
    before = [prototype.clone() for prototype in method.prototypes]
    optimizer = torch.optim.SGD(method.parameters(), lr=1.0)
    out = optimizer_step(method, _batch(ctx.images, torch.arange(12)), optimizer, ctx)
    assert out.loss.requires_grad
    for prototype, old in zip(method.prototypes, before, strict=True):
        assert prototype.grad is None and not prototype.requires_grad
        assert torch.equal(prototype, old)
    assert method.projection.mlp[0].weight.grad is not None  # the rest did learn


def test_loss_is_the_mean_over_heads_of_the_multicrop_cross_entropy_by_hand() -> None:
    method, ctx = _ready_method()
    assert ctx.images is not None
    # Sample 5 was never assigned in head 1; index -1 is padding.
    method.assignments[1, 5] = IGNORE_LABEL
    index = torch.tensor([5, 2, -1, 17])
    batch = _batch(ctx.images, index)
    method.eval()  # no memory update, BatchNorm on running statistics: a pure function to replay by hand
    loss = method(batch, ctx).loss
    with torch.no_grad():
        z = [F.normalize(method.projection(method.backbone(view)), dim=1) for view in batch.views]
    expected_heads = []
    for head, prototypes in enumerate(method.prototypes):
        terms = []
        for view in z:
            for row, sample in enumerate(index.tolist()):
                if sample < 0 or int(method.assignments[head, sample]) < 0:
                    continue
                scores = view[row] @ prototypes.T / 0.1
                target = int(method.assignments[head, sample])
                terms.append(float(torch.logsumexp(scores, 0) - scores[target]))
        expected_heads.append(sum(terms) / len(terms))
    assert len(expected_heads) == 2
    assert float(loss.detach()) == pytest.approx(sum(expected_heads) / 2, rel=1e-5)


def test_loss_function_ignores_rows_and_heads_with_nothing_to_count() -> None:
    embeddings = F.normalize(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)), dim=2)
    prototypes = [F.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(1)), dim=1)]
    targets = torch.tensor([[IGNORE_LABEL, IGNORE_LABEL, IGNORE_LABEL]])
    assert float(deepcluster_v2_loss(embeddings, prototypes, targets, 0.1)) == 0.0
    targets = torch.tensor([[2, IGNORE_LABEL, 0]])
    logits = embeddings.flatten(0, 1) @ prototypes[0].T / 0.1
    expected = F.cross_entropy(logits[[0, 2, 3, 5]], torch.tensor([2, 0, 2, 0]))
    torch.testing.assert_close(deepcluster_v2_loss(embeddings, prototypes, targets, 0.1), expected)
    assert math.isfinite(float(expected))


def test_training_step_writes_its_embeddings_into_the_memory_by_index() -> None:
    method, ctx = _ready_method()
    assert ctx.images is not None
    index = torch.tensor([7, -1, 30, 2])
    batch = _batch(ctx.images, index)
    before = method.memory.clone()
    method.train()
    # BatchNorm in train mode: the embeddings come from this very forward, so capture them.
    captured: list[torch.Tensor] = []
    handle = method.projection.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    method(batch, ctx)
    handle.remove()
    z = F.normalize(captured[0], dim=1).view(3, 4, -1)
    for view in (0, 1):
        torch.testing.assert_close(method.memory[view, [7, 30, 2]], z[view, [0, 2, 3]])
    untouched = torch.ones(NUM_SAMPLES, dtype=torch.bool)
    untouched[[7, 30, 2]] = False
    assert torch.equal(method.memory[:, untouched], before[:, untouched])


def test_buffers_come_back_from_a_checkpoint() -> None:
    method, ctx = _ready_method()
    assert ctx.images is not None
    fresh = DeepClusterV2(TinyBackbone(num_features=8), method.cfg)
    fresh.load_state_dict(method.state_dict())
    assert bool(fresh.memory_filled)
    for name in ("memory", "assignments", "sample_labels", "prototypes_0", "prototypes_1"):
        assert torch.equal(getattr(fresh, name), getattr(method, name)), name
    method.eval()
    fresh.eval()
    batch = _batch(ctx.images, torch.arange(6))
    torch.testing.assert_close(fresh(batch, ctx).loss, method(batch, ctx).loss)
    # A resumed run does not redo the memory pass.
    fresh.on_train_start(ctx)
    assert ctx.extracted == ["projection"]


def test_errors_are_clear() -> None:
    method = DeepClusterV2(TinyBackbone(), DeepClusterV2Config(hidden_dim=0, feat_dim=4, num_prototypes=(3,)))
    with pytest.raises(ModelError, match="no clustering yet"):
        method(_batch(torch.randn(4, 3, 8, 8), torch.arange(4)), FakeContext())
    with pytest.raises(ModelError, match="num_prototypes"):
        DeepClusterV2Config(num_prototypes=())
    too_many = DeepClusterV2(
        TinyBackbone(), DeepClusterV2Config(hidden_dim=0, feat_dim=4, num_prototypes=(50,))
    )
    ctx = FakeContext(num_samples=10, images=torch.randn(10, 3, 8, 8))
    too_many.on_train_start(ctx)
    with pytest.raises(ModelError, match="k=50 is larger than the number of samples"):
        too_many.on_epoch_start(ctx)
