"""DINO: the loss and centre against a double loop, schedules, the EMA teacher, the last layer, metrics."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import FakeContext, TinyBackbone, optimizer_step, random_batch
from torch import Tensor

from clusterssl.errors import ModelError
from clusterssl.models.backbones import DropPath, create_backbone
from clusterssl.models.dino import DINO, DINOConfig, DINOLoss, collapse_metrics
from clusterssl.models.factory import build_method
from clusterssl.models.heads import DINOHead
from clusterssl.models.schedules import cosine_schedule, warmup_cosine_schedule

SMALL = DINOConfig(out_dim=12, hidden_dim=16, bottleneck_dim=5)


def make_dino(cfg: DINOConfig = SMALL, seed: int = 0) -> DINO:
    torch.manual_seed(seed)
    return DINO(TinyBackbone(num_features=8), cfg)


def loop_loss_and_center(
    student: list[Tensor],
    teacher: list[Tensor],
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
    momentum: float,
) -> tuple[Tensor, Tensor]:
    """DINO's loss as the paper writes it (pairs t ≠ s, per sample) and the centre after the update."""
    total, pairs = torch.zeros((), dtype=torch.float64), 0
    for t, teacher_out in enumerate(teacher):
        p_t = F.softmax((teacher_out.double() - center.double()) / teacher_temp, dim=-1)
        for s, student_out in enumerate(student):
            if s == t:
                continue
            log_p_s = F.log_softmax(student_out.double() / student_temp, dim=-1)
            per_sample = [-(p_t[b] * log_p_s[b]).sum() for b in range(p_t.shape[0])]
            total, pairs = total + torch.stack(per_sample).mean(), pairs + 1
    batch_mean = torch.cat(teacher).double().mean(dim=0, keepdim=True)
    return total / pairs, center.double() * momentum + batch_mean * (1 - momentum)


# --------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize(("num_student", "num_teacher"), [(2, 2), (6, 2), (3, 1)])
def test_loss_and_center_equal_the_double_loop(num_student: int, num_teacher: int) -> None:
    generator = torch.Generator().manual_seed(num_student)
    student = [torch.randn(4, 9, generator=generator) for _ in range(num_student)]
    teacher = [torch.randn(4, 9, generator=generator) for _ in range(num_teacher)]
    loss_fn = DINOLoss(9, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, 9, generator=generator))  # a non-zero centre changes the targets
    expected_loss, expected_center = loop_loss_and_center(student, teacher, loss_fn.center, 0.1, 0.05, 0.9)
    loss = loss_fn(student, teacher, teacher_temp=0.05)
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_fn.center.double(), expected_center, rtol=1e-6, atol=1e-7)


def test_loss_worked_by_hand() -> None:
    # One teacher crop, one other student crop, K = 2, B = 1, zero centre, τ_s = τ_t = 1:
    # p_t = softmax(ln 3, 0) = (3/4, 1/4), log p_s = log softmax(0, 0) = (−ln 2, −ln 2) → loss = ln 2.
    # The teacher's own student crop (s = t = 0) is skipped, whatever it holds.
    loss_fn = DINOLoss(2, student_temp=1.0, center_momentum=0.5)
    teacher = [torch.tensor([[math.log(3.0), 0.0]])]
    student = [torch.tensor([[100.0, -100.0]]), torch.tensor([[0.0, 0.0]])]
    assert loss_fn(student, teacher, teacher_temp=1.0).item() == pytest.approx(math.log(2.0))
    # centre ← 0.5 · 0 + 0.5 · (ln 3, 0)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.5 * math.log(3.0), 0.0]]))


def test_loss_gradient_reaches_students_only_and_center_update_can_be_skipped() -> None:
    loss_fn = DINOLoss(5)
    student = [torch.randn(3, 5, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
    loss_fn(student, teacher, 0.04, update_center=False).backward()
    assert torch.equal(loss_fn.center, torch.zeros(1, 5))
    assert all(s.grad is not None for s in student) and all(t.grad is None for t in teacher)


# ------------------------------------------------------------------------------------------- schedules


def test_teacher_temperature_warms_up_like_dinos_linspace() -> None:
    cfg = DINOConfig()  # 0.04 → 0.07 over 30 epochs
    reference = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(70, 0.07)])
    assert [cfg.teacher_temperature(epoch) for epoch in range(100)] == pytest.approx(reference.tolist())
    assert cfg.teacher_temperature(0) == 0.04 and cfg.teacher_temperature(29) == pytest.approx(0.07)
    assert cfg.teacher_temperature(15) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert replace(cfg, warmup_teacher_temp_epochs=0).teacher_temperature(0) == 0.07


@pytest.mark.parametrize("warmup_epochs", [0, 1, 2, 30])
def test_teacher_temperature_follows_dinos_schedule_for_every_warmup_length(warmup_epochs: int) -> None:
    """DINO's schedule is np.linspace(warm-up, final, warm-up epochs) then the final value, so a single
    warm-up epoch runs at the warm-up temperature, not the final one."""
    cfg = replace(
        DINOConfig(), warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=warmup_epochs
    )
    epochs = 40
    reference = np.concatenate(
        (np.linspace(0.04, 0.07, warmup_epochs), np.full(epochs - warmup_epochs, 0.07))
    )
    assert [cfg.teacher_temperature(epoch) for epoch in range(epochs)] == pytest.approx(reference.tolist())


def test_teacher_momentum_follows_a_cosine_from_0996_to_1() -> None:
    cfg = DINOConfig()
    total = 1000
    assert cfg.teacher_momentum(0, total) == pytest.approx(0.996)
    assert cfg.teacher_momentum(500, total) == pytest.approx(0.998)
    assert cfg.teacher_momentum(total, total) == pytest.approx(1.0)
    for step in (1, 137, 999):  # DINO's cosine_scheduler: 1 + (0.996 − 1)(1 + cos(π i / N)) / 2
        assert cfg.teacher_momentum(step, total) == pytest.approx(
            1 - 0.004 * (1 + math.cos(math.pi * step / total)) / 2
        )


def test_warmup_cosine_schedule_values() -> None:
    # Linear from 0 to 1.0 over 10 steps, then a cosine from 1.0 to 0.1 over the remaining 90.
    assert warmup_cosine_schedule(1.0, 0.1, 0, 100, warmup_steps=10) == 0.0
    assert warmup_cosine_schedule(1.0, 0.1, 5, 100, warmup_steps=10) == pytest.approx(0.5)
    assert warmup_cosine_schedule(1.0, 0.1, 10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert warmup_cosine_schedule(1.0, 0.1, 55, 100, warmup_steps=10) == pytest.approx(0.55)
    assert warmup_cosine_schedule(1.0, 0.1, 100, 100, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_schedule(0.04, 0.4, 50, 100) == pytest.approx(0.22)  # DINO's weight decay, half way


# ----------------------------------------------------------------------------------------------- head


def test_head_last_layer_rows_have_unit_norm_that_training_cannot_change() -> None:
    torch.manual_seed(0)
    head = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4)
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        optimizer.zero_grad()
        head(torch.randn(6, 8)).square().sum().backward()
        optimizer.step()
    assert head.last_layer.magnitude.grad is None and not head.last_layer.magnitude.requires_grad
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(10))
    # Without norm_last_layer the magnitude is learned.
    free = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    free(torch.randn(6, 8)).square().sum().backward()
    assert free.last_layer.magnitude.grad is not None


def test_head_structure_and_init() -> None:
    torch.manual_seed(0)
    head = DINOHead(384, 1000, hidden_dim=2048, bottleneck_dim=256)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(384, 2048), (2048, 2048), (2048, 256)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    assert linears[1].weight.std().item() == pytest.approx(0.02, abs=0.001)
    assert head.last_layer.direction.shape == (1000, 256)
    assert not any(name.endswith("bias") for name, _ in head.last_layer.named_parameters())
    # The output is the bottleneck's unit vector times unit rows: every logit lies in [−1, 1].
    assert head(torch.randn(4, 384)).abs().max() <= 1.0 + 1e-6


# ------------------------------------------------------------------------------------------- the method


def test_teacher_starts_equal_without_gradient_and_is_the_feature_extractor() -> None:
    model = make_dino()
    for (name, student), teacher in zip(
        list(model.backbone.named_parameters()) + list(model.head.named_parameters()),
        list(model.teacher_backbone.parameters()) + list(model.teacher_head.parameters()),
        strict=True,
    ):
        assert torch.equal(student, teacher), name
        assert not teacher.requires_grad
    assert model.feature_extractor() is model.teacher_backbone


def test_teacher_has_no_stochastic_depth_even_in_train_mode() -> None:
    """A ViT student with drop_path_rate > 0: the teacher copy must see the whole network (as the
    original builds it without drop path), so in train mode its output is deterministic and equals the
    eval-mode output, while the student's paths are still dropped."""
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_p4", depth=2, dim=16, num_heads=2, drop_path_rate=0.9)
    model = DINO(vit, SMALL).train()
    images = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        first, second = model.teacher_backbone(images), model.teacher_backbone(images)
        whole = model.teacher_backbone.eval()(images)
        student_a, student_b = model.backbone(images), model.backbone(images)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, whole, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(student_a, student_b)  # the student still drops paths
    assert max(
        layer.drop_prob for layer in model.backbone.modules() if isinstance(layer, DropPath)
    ) == pytest.approx(0.9)


def test_forward_equals_the_loss_on_student_all_crops_and_teacher_global_crops() -> None:
    model = make_dino()
    with torch.no_grad():
        model.loss_fn.center.normal_()
    batch = random_batch(4, sizes=(16, 16, 8, 8, 8))
    center = model.loss_fn.center.clone()
    with torch.no_grad():
        student = [model.head(model.backbone(view)) for view in batch.views]
        teacher = [model.teacher_head(model.teacher_backbone(view)) for view in batch.global_views]
    ctx = FakeContext(epoch=10)
    model.on_epoch_start(ctx)
    temp = SMALL.teacher_temperature(10)
    expected_loss, expected_center = loop_loss_and_center(student, teacher, center, 0.1, temp, 0.9)
    output = model(batch, ctx)
    torch.testing.assert_close(output.loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.loss_fn.center.double(), expected_center, rtol=1e-6, atol=1e-7)
    assert output.metrics["teacher_temp"].item() == pytest.approx(temp)
    # KL(teacher ‖ student) over the pairs is the loss minus the teacher entropy.
    assert output.metrics["kl_teacher_student"].item() == pytest.approx(
        output.loss.item() - output.metrics["teacher_entropy"].item(), rel=1e-5
    )


def test_one_step_moves_the_teacher_by_exactly_the_ema_formula() -> None:
    model = make_dino()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ctx = FakeContext(epoch=1, epochs=4, step=7, steps_per_epoch=5)

    def teacher_parameters() -> list[Tensor]:
        return list(model.teacher_backbone.parameters()) + list(model.teacher_head.parameters())

    teacher_before = [p.detach().clone() for p in teacher_parameters()]
    optimizer_step(model, random_batch(4, seed=3), optimizer, ctx)
    momentum = 1 - 0.004 * (1 + math.cos(math.pi * 7 / 20)) / 2  # step 7 of 4 × 5
    student_after = list(model.backbone.parameters()) + list(model.head.parameters())
    for before, student, after in zip(teacher_before, student_after, teacher_parameters(), strict=True):
        torch.testing.assert_close(
            after, momentum * before + (1 - momentum) * student.detach(), rtol=0, atol=1e-7
        )
    # The student did move, so the teacher lags it.
    assert not torch.allclose(model.head.mlp[0].weight, model.teacher_head.mlp[0].weight)


def test_last_layer_is_frozen_in_the_first_epoch_only() -> None:
    model = make_dino()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    assert list(model.frozen_parameters(FakeContext(epoch=0))) == [
        model.head.last_layer.direction,
        model.head.last_layer.magnitude,
    ]
    assert list(model.frozen_parameters(FakeContext(epoch=1))) == []

    direction = model.head.last_layer.direction.detach().clone()
    mlp_weight = model.head.mlp[0].weight.detach().clone()
    optimizer_step(
        model, random_batch(4, seed=1), optimizer, FakeContext(epoch=0, epochs=2, steps_per_epoch=1)
    )
    assert torch.equal(model.head.last_layer.direction, direction)
    assert not torch.equal(model.head.mlp[0].weight, mlp_weight)
    optimizer_step(
        model, random_batch(4, seed=2), optimizer, FakeContext(epoch=1, epochs=2, step=1, steps_per_epoch=1)
    )
    assert not torch.equal(model.head.last_layer.direction, direction)
    torch.testing.assert_close(model.head.last_layer.weight.norm(dim=1), torch.ones(SMALL.out_dim))


def test_collapse_metrics_definitions() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 3, 6, generator=generator)
    student = torch.randn(4, 3, 6, generator=generator)
    center = torch.randn(1, 6, generator=generator)
    metrics = collapse_metrics(student, teacher, center, student_temp=0.1, teacher_temp=0.07)
    p_t = F.softmax((teacher - center) / 0.07, dim=-1)
    entropy = -(p_t * p_t.log()).sum(-1)
    assert metrics["teacher_entropy"].item() == pytest.approx(entropy.mean().item(), rel=1e-5)
    marginal = p_t.mean(dim=(0, 1))
    assert metrics["teacher_marginal_entropy"].item() == pytest.approx(
        -(marginal * marginal.log()).sum().item(), rel=1e-5
    )
    kls = [
        (p_t[t] * (p_t[t].log() - F.log_softmax(student[s] / 0.1, dim=-1))).sum(-1).mean()
        for t in range(2)
        for s in range(4)
        if s != t
    ]
    assert metrics["kl_teacher_student"].item() == pytest.approx(torch.stack(kls).mean().item(), rel=1e-4)
    raw, ref = F.softmax(teacher / 0.07, dim=-1), F.softmax(center / 0.07, dim=-1)
    assert metrics["kl_teacher_center"].item() == pytest.approx(
        (raw * (raw / ref).log()).sum(-1).mean().item(), rel=1e-4
    )
    # A teacher that outputs its centre for every input is collapsed: KL to the centre is 0.
    constant = center.expand(2, 3, 6)
    assert collapse_metrics(student, constant, center, 0.1, 0.07)[
        "kl_teacher_center"
    ].item() == pytest.approx(0.0, abs=1e-6)


def test_config_errors_and_factory() -> None:
    with pytest.raises(ModelError, match=r"dino: momentum_teacher must lie in \[0, 1\]"):
        DINOConfig(momentum_teacher=1.5)
    with pytest.raises(ModelError, match=r"config key 'method\.norm_last_layer' must be bool, got 'yes'"):
        build_method("dino", "vit_tiny_p4", {"norm_last_layer": "yes"})
    with pytest.raises(ModelError, match="at least 2 views"):
        make_dino()(random_batch(2, sizes=(8,), num_global=1), FakeContext())
    model = build_method(
        "dino", "vit_tiny_p4", {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}, {"depth": 1}
    )
    assert isinstance(model, DINO) and model.head.last_layer.direction.shape == (64, 16)
    output = model(random_batch(2, sizes=(32, 32, 16)), FakeContext())
    assert torch.isfinite(output.loss) and output.loss.item() > 0


def test_bf16_autocast_gives_the_float32_loss_within_bf16_precision() -> None:
    model = make_dino()
    batch = random_batch(8, seed=4)
    reference = make_dino()
    reference.load_state_dict(model.state_dict())
    expected = reference(batch, FakeContext()).loss
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        output = model(batch, FakeContext())
    assert output.loss.dtype == torch.float32
    torch.testing.assert_close(output.loss, expected, rtol=0.03, atol=0)
    torch.testing.assert_close(model.loss_fn.center, reference.loss_fn.center, rtol=0.03, atol=1e-3)
