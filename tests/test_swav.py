"""SwAV: the loss against a hand-worked case and a plain loop, the method's plumbing, queue and freezing."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from fakes import FakeContext, TinyBackbone, optimizer_step, random_batch
from torch import Tensor

from clusterssl.config import method_config
from clusterssl.errors import ModelError
from clusterssl.models.factory import build_method
from clusterssl.models.sinkhorn import sinkhorn
from clusterssl.models.swav import SwAV, SwAVConfig, code_metrics, swav_loss
from clusterssl.models.types import PADDING_INDEX, Batch

SMALL = SwAVConfig(hidden_dim=16, feat_dim=6, num_prototypes=5, freeze_prototypes_niters=0)


def make_swav(cfg: SwAVConfig = SMALL, seed: int = 0) -> SwAV:
    torch.manual_seed(seed)
    return SwAV(TinyBackbone(num_features=8), cfg)


def loop_loss(
    scores: list[Tensor], codes: list[Tensor], crops_for_assign: list[int], temperature: float
) -> Tensor:
    """The loss exactly as the SwAV paper defines it: a loop over assignment crops, other views, and samples."""
    total = torch.zeros((), dtype=torch.float64)
    for a, crop in enumerate(crops_for_assign):
        subloss = torch.zeros((), dtype=torch.float64)
        others = [v for v in range(len(scores)) if v != crop]
        for v in others:
            log_p = F.log_softmax(scores[v].double() / temperature, dim=1)
            per_sample = [-(codes[a][b].double() * log_p[b]).sum() for b in range(scores[v].shape[0])]
            subloss = subloss + torch.stack(per_sample).mean()
        total = total + subloss / len(others)
    return total / len(crops_for_assign)


# --------------------------------------------------------------------------------------------- the loss


def test_loss_worked_by_hand() -> None:
    # Two views, one assignment crop (view 0), K = 2, B = 2, τ = 1.
    # View 1's predictions: softmax([0, 0]) = (1/2, 1/2), softmax([ln 3, 0]) = (3/4, 1/4).
    # Codes of view 0: (1, 0) and (1/2, 1/2). Cross-entropies: −ln(1/2) = ln 2 and
    # −(½ ln ¾ + ½ ln ¼) = ½ ln(4/3) + ln 2. Mean over the batch: ln 2 + ¼ ln(4/3) ≈ 0.76506.
    scores = torch.tensor([[[5.0, -5.0], [0.0, 1.0]], [[0.0, 0.0], [math.log(3.0), 0.0]]])
    codes = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    expected = math.log(2.0) + 0.25 * math.log(4.0 / 3.0)
    assert swav_loss(scores, codes, [0], temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # The assignment view's own scores never enter the loss.
    scores[0] = torch.randn(2, 2)
    assert swav_loss(scores, codes, [0], temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("views", "crops_for_assign"), [(2, [0, 1]), (5, [0, 1]), (4, [1, 3])])
def test_loss_equals_the_plain_loop(views: int, crops_for_assign: list[int]) -> None:
    generator = torch.Generator().manual_seed(views)
    scores = [torch.randn(3, 7, generator=generator) for _ in range(views)]
    codes = [torch.softmax(torch.randn(3, 7, generator=generator), dim=1) for _ in crops_for_assign]
    expected = loop_loss(scores, codes, crops_for_assign, 0.1)
    got = swav_loss(scores, codes, crops_for_assign, 0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_code_metrics_definitions() -> None:
    codes = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    metrics = code_metrics(codes)
    assert metrics["code_entropy"].item() == pytest.approx((0 + 0 + math.log(2) + math.log(3)) / 4, rel=1e-5)
    assert metrics["code_sharpness"].item() == pytest.approx((1 + 1 + 0.5 + 1 / 3) / 4, rel=1e-6)
    assert metrics["prototypes_used"].item() == 2  # argmaxes 0, 1, 0, 0


# ------------------------------------------------------------------------------------------- the method


def manual_forward(model: SwAV, batch: Batch) -> tuple[Tensor, Tensor]:
    """Loss and codes recomputed view by view from the model's modules. Like SwAV, it first normalises the
    prototypes in place (so the gradient does not flow through the normalisation)."""
    with torch.no_grad():
        model.prototypes.weight.copy_(
            model.prototypes.weight / model.prototypes.weight.norm(dim=1, keepdim=True)
        )
    prototypes = model.prototypes.weight
    cfg = model.cfg
    # One projection call over all views, as BatchNorm in the head sees every crop together.
    features = torch.cat([model.backbone(view) for view in batch.views])
    embeddings = F.normalize(model.projection(features), dim=1)
    scores = list((embeddings @ prototypes.t()).split(batch.size))
    codes = [sinkhorn(scores[crop], cfg.epsilon, cfg.sinkhorn_iterations) for crop in cfg.crops_for_assign]
    return loop_loss(scores, codes, list(cfg.crops_for_assign), cfg.temperature), torch.stack(codes)


def test_forward_equals_the_view_by_view_computation() -> None:
    model = make_swav()
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)  # not unit-norm: forward must normalise first
    batch = random_batch(6, sizes=(16, 16, 8, 8, 8))
    reference = make_swav()
    reference.load_state_dict(model.state_dict())
    expected, _ = manual_forward(reference, batch)
    output = model(batch, FakeContext())
    torch.testing.assert_close(output.loss.double(), expected, rtol=1e-5, atol=1e-6)
    norms = model.prototypes.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(SMALL.num_prototypes))
    assert set(output.metrics) == {"code_entropy", "code_sharpness", "prototypes_used", "queue_in_use"}
    assert 1 <= output.metrics["prototypes_used"] <= SMALL.num_prototypes


def test_prototypes_are_renormalised_at_the_start_of_every_step() -> None:
    model = make_swav()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ctx = FakeContext(epochs=1, steps_per_epoch=3)
    for step in range(3):
        ctx.step = step
        optimizer_step(model, random_batch(4, seed=step), optimizer, ctx)
        # The step itself moved the prototypes off the sphere; the next forward brings them back.
        assert not torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(5))
        model(random_batch(4, seed=10 + step), ctx)
        torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(5))


def test_too_few_views_or_assign_crop_out_of_range_is_a_model_error() -> None:
    model = make_swav(replace(SMALL, crops_for_assign=(0, 3)))
    with pytest.raises(ModelError, match=r"crops_for_assign \(0, 3\) refers to views the batch lacks"):
        model(random_batch(2, sizes=(8, 8, 4)), FakeContext())
    with pytest.raises(ModelError, match="at least 2 views"):
        make_swav()(random_batch(2, sizes=(8,), num_global=1), FakeContext())


# ------------------------------------------------------------------------------------------- freezing


def test_frozen_parameters_are_the_prototypes_for_the_first_iterations() -> None:
    model = make_swav(replace(SMALL, freeze_prototypes_niters=3))
    assert list(model.frozen_parameters(FakeContext(step=0))) == [model.prototypes.weight]
    assert list(model.frozen_parameters(FakeContext(step=2))) == [model.prototypes.weight]
    assert list(model.frozen_parameters(FakeContext(step=3))) == []


def test_one_sgd_step_freezes_then_moves_prototypes_by_the_loss_gradient() -> None:
    lr = 0.3
    model = make_swav(replace(SMALL, freeze_prototypes_niters=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batch = random_batch(6, seed=1)

    # Step 0 (frozen): the prototypes end as the normalised initial ones; the projection moves.
    normalised = F.normalize(model.prototypes.weight.detach(), dim=1)
    projection_before = model.projection.mlp[0].weight.detach().clone()
    optimizer_step(model, batch, optimizer, FakeContext(step=0))
    torch.testing.assert_close(model.prototypes.weight.detach(), normalised)
    assert not torch.allclose(model.projection.mlp[0].weight, projection_before)

    # Step 1 (free): p ← normalise(p) − lr · ∂L/∂p, with ∂L/∂p from the independent loop computation
    # (codes are constants, so the gradient flows through the scores only).
    reference = make_swav(replace(SMALL, freeze_prototypes_niters=1))
    reference.load_state_dict(model.state_dict())
    loss, _ = manual_forward(reference, batch)
    loss.backward()
    expected = reference.prototypes.weight.detach() - lr * reference.prototypes.weight.grad
    optimizer_step(model, batch, optimizer, FakeContext(step=1))
    torch.testing.assert_close(model.prototypes.weight.detach(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- queue

QUEUED = replace(SMALL, queue_length=10, epoch_queue_starts=2)  # batch 4 → 8 rows (two batches)


def embeddings_of(model: SwAV, batch: Batch, crop: int) -> Tensor:
    with torch.no_grad():
        return model.embed(batch.views).view(len(batch.views), batch.size, -1)[crop]


def test_queue_is_not_filled_before_its_epoch() -> None:
    model = make_swav(QUEUED)
    ctx = FakeContext(epoch=0)
    model.on_train_start(ctx)
    for seed in range(3):
        output = model(random_batch(4, seed=seed), ctx)
        assert output.metrics["queue_in_use"] == 0.0
    assert int(model.queue_filled) == 0


def test_queue_fills_fifo_newest_first_and_is_used_only_once_full() -> None:
    model = make_swav(QUEUED)
    ctx = FakeContext(epoch=2)
    model.on_epoch_start(ctx)
    batches = [random_batch(4, seed=seed) for seed in range(3)]

    assert model(batches[0], ctx).metrics["queue_in_use"] == 0.0
    assert model.queue.shape == (2, 8, 6) and int(model.queue_filled) == 4
    assert model(batches[1], ctx).metrics["queue_in_use"] == 0.0
    assert int(model.queue_filled) == 8
    for a, crop in enumerate(QUEUED.crops_for_assign):
        expected = torch.cat([embeddings_of(model, batches[1], crop), embeddings_of(model, batches[0], crop)])
        torch.testing.assert_close(model.queue[a], expected)

    # Full: batch 2's codes come from Sinkhorn over [queue (batch 1, batch 0) ; batch 2], last rows kept.
    queue_before = model.queue.clone()
    with torch.no_grad():
        prototypes = F.normalize(model.prototypes.weight, dim=1)
        scores = embeddings_of(model, batches[2], 0) @ prototypes.t()
        queued_codes = sinkhorn(torch.cat([queue_before[0] @ prototypes.t(), scores]))[-4:]
        plain_codes = sinkhorn(scores)
    assert not torch.allclose(queued_codes, plain_codes, atol=1e-3)  # the queue matters here
    output = model(batches[2], ctx)
    assert output.metrics["queue_in_use"] == 1.0
    torch.testing.assert_close(
        output.metrics["code_sharpness"].item(), code_sharpness_of(model, batches[2], queue_before)
    )
    # FIFO: batch 2 in front, batch 1 behind it, batch 0 dropped.
    torch.testing.assert_close(model.queue[0, :4], embeddings_of(model, batches[2], 0))
    torch.testing.assert_close(model.queue[0, 4:], queue_before[0, :4])


def code_sharpness_of(model: SwAV, batch: Batch, queue: Tensor) -> float:
    """Mean max code of the batch over both assignment crops, the queue placed before the batch."""
    with torch.no_grad():
        prototypes = F.normalize(model.prototypes.weight, dim=1)
        codes = [
            sinkhorn(
                torch.cat([queue[a] @ prototypes.t(), embeddings_of(model, batch, crop) @ prototypes.t()])
            )[-4:]
            for a, crop in enumerate(model.cfg.crops_for_assign)
        ]
    return torch.cat(codes).max(dim=1).values.mean().item()


def test_queued_loss_uses_the_queued_codes() -> None:
    model = make_swav(QUEUED)
    ctx = FakeContext(epoch=5)
    model.on_epoch_start(ctx)
    model(random_batch(4, seed=0), ctx)
    model(random_batch(4, seed=1), ctx)
    batch = random_batch(4, seed=2)
    queue = model.queue.clone()
    reference = make_swav(QUEUED)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        prototypes = F.normalize(reference.prototypes.weight, dim=1)
        features = torch.cat([reference.backbone(view) for view in batch.views])
        scores = list((F.normalize(reference.projection(features), dim=1) @ prototypes.t()).split(4))
        codes = [
            sinkhorn(torch.cat([queue[a] @ prototypes.t(), scores[crop]]))[-4:]
            for a, crop in enumerate((0, 1))
        ]
    expected = loop_loss(scores, codes, [0, 1], QUEUED.temperature)
    torch.testing.assert_close(model(batch, ctx).loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_queue_skips_padding_and_stays_untouched_in_eval_mode() -> None:
    model = make_swav(QUEUED)
    ctx = FakeContext(epoch=2)
    model.on_epoch_start(ctx)
    batch = random_batch(4, seed=0)
    batch.index[1] = PADDING_INDEX
    model(batch, ctx)
    assert int(model.queue_filled) == 3
    valid = embeddings_of(model, batch, 0)[[0, 2, 3]]
    torch.testing.assert_close(model.queue[0, :3], valid)
    model.eval()
    before = model.queue.clone()
    model(random_batch(4, seed=1), ctx)
    assert torch.equal(model.queue, before) and int(model.queue_filled) == 3


def test_queue_length_rounds_down_to_the_global_batch_and_rejects_too_short() -> None:
    model = make_swav(replace(SMALL, queue_length=3840))
    assert model.local_queue_length(256) == 3840
    assert model.local_queue_length(100) == 3800
    with pytest.raises(ModelError, match="queue_length 3840 is shorter than the global batch 4096"):
        model.local_queue_length(4096)


def test_queue_travels_with_the_state_dict() -> None:
    model = make_swav(QUEUED)
    ctx = FakeContext(epoch=2)
    model.on_epoch_start(ctx)
    model(random_batch(4, seed=0), ctx)
    restored = make_swav(QUEUED, seed=1)
    assert restored.queue.shape[1] == 0  # allocated lazily...
    restored.load_state_dict(model.state_dict())  # ...and resized by loading
    assert torch.equal(restored.queue, model.queue) and int(restored.queue_filled) == 4


def test_config_errors_and_factory() -> None:
    with pytest.raises(ModelError, match="swav: epsilon must be positive"):
        SwAVConfig(epsilon=0.0)
    with pytest.raises(ModelError, match=r"unknown method 'swv'; known: .*swav"):
        method_config({"name": "swv"})
    with pytest.raises(ModelError, match=r"config key 'method.crops_for_assign' must be a list, got 0"):
        method_config({"name": "swav", "crops_for_assign": 0})
    assert method_config({"name": "swav", "queue_length": 3840}) == SwAVConfig(queue_length=3840)
    with pytest.raises(
        ModelError, match=r"unknown config key 'method\.epsilonn'; known in method: hidden_dim"
    ):
        build_method("swav", "resnet18_small", {"epsilonn": 0.03})
    model = build_method(
        "swav", "resnet18_small", {"num_prototypes": 30, "crops_for_assign": [0, 1], "epsilon": 1}
    )
    assert isinstance(model, SwAV) and model.cfg.crops_for_assign == (0, 1) and model.cfg.epsilon == 1.0
    assert model.prototypes.weight.shape == (30, 128) and model.projection.mlp[0].in_features == 512


def test_bf16_autocast_gives_the_float32_loss_within_bf16_precision() -> None:
    model = make_swav(replace(SMALL, num_prototypes=50))
    batch = random_batch(8, seed=4)
    reference = make_swav(replace(SMALL, num_prototypes=50))
    reference.load_state_dict(model.state_dict())
    expected = reference(batch, FakeContext()).loss
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        output = model(batch, FakeContext())
    assert output.loss.dtype == torch.float32
    torch.testing.assert_close(output.loss, expected, rtol=0.02, atol=0)
