"""iBOT: the ViT's masked tokens, block masks, the loss and centres against a double loop, the heads."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import FakeContext, TinyBackbone, optimizer_step, random_batch
from torch import Tensor

from clusterssl.errors import ModelError
from clusterssl.models.backbones import VisionTransformer, create_backbone
from clusterssl.models.factory import build_method
from clusterssl.models.ibot import IBOT, IBOTConfig, masked_patch_cross_entropy
from clusterssl.models.masking import BlockMaskSpec, block_mask, draw_block_masks
from clusterssl.models.types import Batch

SMALL = IBOTConfig(out_dim=12, hidden_dim=16, bottleneck_dim=5)
SEPARATE = IBOTConfig(out_dim=12, patch_out_dim=7, shared_head=False, hidden_dim=16, bottleneck_dim=5)
ALWAYS_MASKED = IBOTConfig(out_dim=12, hidden_dim=16, bottleneck_dim=5, mask_share=1.0)


def tiny_vit() -> VisionTransformer:
    return create_backbone("vit_tiny_p4", img_size=16, depth=1, dim=16, num_heads=2)


def make_ibot(cfg: IBOTConfig = SMALL, seed: int = 0) -> IBOT:
    torch.manual_seed(seed)
    return IBOT(tiny_vit(), cfg)


# ------------------------------------------------------------------------------------------- the ViT


def test_forward_is_the_class_token_of_forward_features() -> None:
    torch.manual_seed(0)
    vit = tiny_vit()
    images = torch.randn(3, 3, 16, 12)
    tokens = vit.forward_features(images)
    assert tokens.shape == (3, 1 + 4 * 3, 16)
    torch.testing.assert_close(vit(images), tokens[:, 0], rtol=0, atol=0)


def test_masked_input_differs_from_the_unmasked_one_exactly_at_masked_patches() -> None:
    torch.manual_seed(0)
    vit = tiny_vit()
    images = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 6]] = True
    mask[1, [15]] = True
    token = torch.randn(16)
    plain, masked = vit.tokens(images), vit.tokens(images, mask, token)
    differs = (plain != masked).any(dim=-1)  # (batch, 1 + patches)
    assert torch.equal(differs[:, 1:], mask) and not differs[:, 0].any()
    # A masked patch is the mask token plus its own position embedding.
    position = vit._position_embedding(4, 4)[0]
    torch.testing.assert_close(masked[0, 1 + 5], token + position[1 + 5])
    # An all-False mask changes nothing, but the token still gets a (zero) gradient.
    token.requires_grad_(True)
    vit.forward_features(images, torch.zeros_like(mask), token).sum().backward()
    assert token.grad is not None and not token.grad.any()


def test_a_mask_without_a_token_or_of_the_wrong_shape_is_refused() -> None:
    vit = tiny_vit()
    with pytest.raises(ValueError, match="mask_token"):
        vit.tokens(torch.randn(1, 3, 16, 16), torch.zeros(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="patches"):
        vit.tokens(torch.randn(1, 3, 16, 16), torch.zeros(1, 9, dtype=torch.bool), torch.zeros(16))


# ------------------------------------------------------------------------------------------- masks


def test_masked_ratio_and_share_follow_the_spec() -> None:
    spec = BlockMaskSpec(ratio=0.3, ratio_var=0.2, share=0.5)
    masks = draw_block_masks(spec, seed=1, epoch=0, index=np.arange(1500), num_views=2, grid=(14, 14))
    counts = masks.sum(axis=-1).ravel()
    masked = counts > 0
    # Half the images are masked (3,000 draws: ±4 standard deviations is ±0.037).
    assert abs(masked.mean() - 0.5) < 0.04
    ratios = counts[masked] / 196
    # Blocks never overshoot the drawn ratio (≤ 0.5) and reach near it: at least 0.1 · 196 − one block.
    assert ratios.max() <= 0.5 and ratios.min() >= 0.05
    assert 0.2 < ratios.mean() < 0.32
    # Spread over the whole range: both thirds of [0.1, 0.5] are well populated.
    assert (ratios < 0.2).mean() > 0.15 and (ratios > 0.35).mean() > 0.15


def test_masks_are_blocks_not_scattered_patches() -> None:
    spec = BlockMaskSpec(ratio=0.3, ratio_var=0.0, share=1.0)
    masks = draw_block_masks(spec, seed=0, epoch=0, index=np.arange(200), num_views=1, grid=(14, 14))
    grids = masks.reshape(-1, 14, 14)
    padded = np.pad(grids, ((0, 0), (1, 1), (1, 1)))
    neighbours = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    # Scattered masks at 30% would leave 1 − 0.7⁴ ≈ 76% of masked patches with a masked neighbour.
    assert (neighbours & grids).sum() / grids.sum() > 0.95


def test_one_block_is_a_rectangle_with_the_aspect_ratio_in_range() -> None:
    # Target = the smallest area on a 12×12 grid (16): a single try fills it when h·w = 16 fits.
    for seed in range(50):
        mask = block_mask(random.Random(seed), 12, 12, target=1.0, min_aspect=0.3)
        rows, cols = np.nonzero(mask)
        if len(rows) == 0:
            continue
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == height * width == 1  # a one-patch target adds one patch, never more
    shapes = set()
    for seed in range(200):
        mask = block_mask(random.Random(seed), 30, 30, target=100.0, min_aspect=0.3)
        rows, cols = np.nonzero(mask)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        if mask.sum() == height * width:  # one block
            shapes.add((height, width))
            assert 0.3 / 1.2 <= height / width <= 1.2 / 0.3  # rounding moves the ratio a little
    assert len(shapes) > 5 and any(h > w for h, w in shapes) and any(h < w for h, w in shapes)


def test_masks_depend_on_the_sample_key_only() -> None:
    spec = BlockMaskSpec(share=1.0)
    whole = draw_block_masks(spec, seed=3, epoch=2, index=[7, 1, 4, 9], num_views=2, grid=(8, 8))
    # Another batch composition (another worker or rank) gives each sample the same masks.
    part = draw_block_masks(spec, seed=3, epoch=2, index=[9, 7], num_views=2, grid=(8, 8))
    assert np.array_equal(part[:, 0], whole[:, 3]) and np.array_equal(part[:, 1], whole[:, 0])
    # The views, epochs and seeds differ from one another.
    assert not np.array_equal(whole[0], whole[1])
    assert not np.array_equal(whole, draw_block_masks(spec, 3, 3, [7, 1, 4, 9], 2, (8, 8)))
    assert not np.array_equal(whole, draw_block_masks(spec, 4, 2, [7, 1, 4, 9], 2, (8, 8)))


def test_only_global_crops_are_masked() -> None:
    model = make_ibot(ALWAYS_MASKED)
    seen: list[tuple[int, bool]] = []
    original = model.backbone.tokens

    def spy(images: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        seen.append((images.shape[-1], mask is not None and bool(mask.any())))
        return original(images, mask, mask_token)

    model.backbone.tokens = spy  # type: ignore[method-assign]
    model(random_batch(4, sizes=(16, 16, 8, 8, 8)), FakeContext())
    assert seen == [(16, True), (8, False)]  # the two globals masked in one call, the locals never


def test_bad_mask_settings_and_a_non_vit_backbone_are_one_clear_error() -> None:
    with pytest.raises(ModelError, match="ibot: mask ratio"):
        IBOTConfig(mask_ratio=0.1, mask_ratio_var=0.2)
    with pytest.raises(ModelError, match="ibot: out_dim"):
        IBOTConfig(out_dim=0)
    with pytest.raises(ModelError, match="ibot needs a ViT backbone"):
        IBOT(TinyBackbone(), SMALL)
    with pytest.raises(ModelError, match="ibot needs a ViT"):
        build_method("ibot", "resnet18")


# -------------------------------------------------------------------------------------------- losses


def test_masked_patch_cross_entropy_worked_by_hand() -> None:
    # Image 0 has two masked patches: p_t = (1/2, 1/2) against log p_s = (−ln 2, −ln 2) costs ln 2, and
    # p_t = (1, 0) against log p_s = (0, −∞ → −100) costs 0; its mean is ln 2 / 2. Image 1 has one patch
    # costing ln 4 (p_t = (1, 0), p_s = (1/4, 3/4)). Image 2 has none: 0, but it counts in the mean.
    teacher = torch.tensor([[0.5, 0.5], [1.0, 0.0], [1.0, 0.0]])
    student = torch.tensor([[-math.log(2), -math.log(2)], [0.0, -100.0], [-math.log(4), math.log(0.75)]])
    loss = masked_patch_cross_entropy(teacher, student, torch.tensor([0, 0, 1]), num_images=3)
    assert loss.item() == pytest.approx((math.log(2) / 2 + math.log(4) + 0.0) / 3)


def loop_ibot(
    student_cls: Tensor,
    student_patch: Tensor,
    teacher_cls: Tensor,
    teacher_patch: Tensor,
    masks: Tensor,
    centers: tuple[Tensor, Tensor],
    cfg: IBOTConfig,
    epoch: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The iBOT paper's loss, one term at a time, and both centres after the update.

    student_cls (S, B, K), student_patch (T, B, N, K'), teacher_cls (T, B, K), teacher_patch (T, B, N, K'),
    masks (T, B, N). Returns (L_cls, L_mim, class centre, patch centre) in float64.
    """
    tau_t = cfg.teacher_temperature(epoch)
    tau_p = cfg.teacher_patch_temperature(epoch)
    c_cls, c_patch = (c.double() for c in centers)
    cls_terms, patch_terms = [], []
    for t in range(teacher_cls.shape[0]):
        for s in range(student_cls.shape[0]):
            if s == t:
                continue
            per_sample = []
            for b in range(student_cls.shape[1]):
                p_t = F.softmax((teacher_cls[t, b].double() - c_cls[0]) / tau_t, dim=-1)
                log_p_s = F.log_softmax(student_cls[s, b].double() / cfg.student_temp, dim=-1)
                per_sample.append(-(p_t * log_p_s).sum())
            cls_terms.append(torch.stack(per_sample).mean())
        per_image = []
        for b in range(teacher_patch.shape[1]):
            total = torch.zeros((), dtype=torch.float64)
            for j in range(teacher_patch.shape[2]):
                if masks[t, b, j]:
                    p_t = F.softmax((teacher_patch[t, b, j].double() - c_patch[0]) / tau_p, dim=-1)
                    log_p_s = F.log_softmax(student_patch[t, b, j].double() / cfg.student_temp, dim=-1)
                    total = total - (p_t * log_p_s).sum()
            per_image.append(total / max(int(masks[t, b].sum()), 1))
        patch_terms.append(torch.stack(per_image).mean())
    m = cfg.center_momentum
    new_cls = c_cls * m + teacher_cls.double().reshape(-1, teacher_cls.shape[-1]).mean(0, keepdim=True) * (
        1 - m
    )
    patch_mean = teacher_patch.double().mean(dim=2).reshape(-1, teacher_patch.shape[-1]).mean(0, keepdim=True)
    return (
        torch.stack(cls_terms).mean(),
        torch.stack(patch_terms).mean(),
        new_cls,
        c_patch * m + patch_mean * (1 - m),
    )


@pytest.mark.parametrize("cfg", [SMALL, SEPARATE], ids=["shared_head", "separate_head"])
def test_forward_equals_the_double_loop_of_the_paper(cfg: IBOTConfig) -> None:
    model = make_ibot(cfg)
    ctx = FakeContext(epoch=1, epochs=5)
    generator = torch.Generator().manual_seed(1)
    # Non-zero centres and a trained-looking teacher (different from the student).
    model.cls_loss.center.copy_(torch.randn(model.cls_loss.center.shape, generator=generator))
    model.patch_center.center.copy_(torch.randn(model.patch_center.center.shape, generator=generator))
    with torch.no_grad():
        for parameter in model.teacher.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    batch = random_batch(5, sizes=(16, 16, 8, 8, 8), seed=2)
    centers = (model.cls_loss.center.clone(), model.patch_center.center.clone())
    masks = model.masks(batch, ctx.epoch)  # (T, B, N)
    assert masks.any() and not masks.all()

    # Every output recomputed, one crop at a time, through the parts.
    patch_head = model.head if model.patch_head is None else model.patch_head
    with torch.no_grad():
        s_tokens = [
            model.backbone.forward_features(v, masks[i], model.mask_token[0])
            for i, v in enumerate(batch.global_views)
        ]
        s_cls = [model.head(t[:, 0]) for t in s_tokens] + [
            model.head(model.backbone(v)) for v in batch.local_views
        ]
        s_patch = torch.stack([patch_head(t[:, 1:]) for t in s_tokens])
        t_tokens = [model.teacher["backbone"].forward_features(v) for v in batch.global_views]
        t_head = model.teacher["head"]
        t_patch_head = t_head if model.patch_head is None else model.teacher["patch_head"]
        t_cls = torch.stack([t_head(t[:, 0]) for t in t_tokens])
        t_patch = torch.stack([t_patch_head(t[:, 1:]) for t in t_tokens])
    assert s_patch.shape[-1] == cfg.patch_dim
    cls_loss, patch_loss, new_cls, new_patch = loop_ibot(
        torch.stack(s_cls), s_patch, t_cls, t_patch, masks, centers, cfg, epoch=1
    )

    output = model(batch, ctx)
    assert output.metrics["cls_loss"] == pytest.approx(cls_loss.item(), rel=1e-5)
    assert output.metrics["patch_loss"] == pytest.approx(patch_loss.item(), rel=1e-5)
    expected = cfg.lambda1 * cls_loss + cfg.lambda2 * patch_loss
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(model.cls_loss.center.double(), new_cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.patch_center.center.double(), new_patch, rtol=1e-5, atol=1e-6)
    assert output.metrics["masked_share"] == pytest.approx(masks.float().mean().item())


def test_loss_weights_and_teacher_temperatures() -> None:
    cfg = IBOTConfig(
        warmup_teacher_temp=0.04,
        teacher_temp=0.06,
        warmup_teacher_patch_temp=0.03,
        teacher_patch_temp=0.07,
        warmup_teacher_temp_epochs=5,
    )
    assert [round(cfg.teacher_patch_temperature(e), 6) for e in (0, 2, 4, 9)] == [0.03, 0.05, 0.07, 0.07]
    assert [round(cfg.teacher_temperature(e), 6) for e in (0, 2, 4, 9)] == [0.04, 0.05, 0.06, 0.06]
    batch = random_batch(4, sizes=(16, 16, 8))
    outputs = {}
    for lambda1, lambda2 in ((1.0, 0.0), (0.0, 1.0), (2.0, 3.0)):
        model = make_ibot(
            IBOTConfig(out_dim=12, hidden_dim=16, bottleneck_dim=5, lambda1=lambda1, lambda2=lambda2)
        )
        outputs[lambda1, lambda2] = model(batch, FakeContext())
    cls_only, patch_only = outputs[1.0, 0.0].loss.item(), outputs[0.0, 1.0].loss.item()
    assert outputs[2.0, 3.0].loss.item() == pytest.approx(2 * cls_only + 3 * patch_only, rel=1e-5)


def test_metrics_cover_both_heads_and_the_masked_share() -> None:
    output = make_ibot()(random_batch(6, sizes=(16, 16, 8)), FakeContext())
    for name in ("teacher_entropy", "teacher_marginal_entropy", "kl_teacher_student", "kl_teacher_center"):
        assert name in output.metrics
    for name in ("teacher_entropy", "teacher_marginal_entropy", "kl_teacher_center", "teacher_temp"):
        assert f"patch_{name}" in output.metrics
    assert 0 <= output.metrics["patch_teacher_entropy"] <= math.log(12) + 1e-5
    assert 0 <= output.metrics["masked_share"] <= 0.5


# ---------------------------------------------------------------------------------- heads and teacher


def test_separate_patch_head_shares_the_mlp_and_has_its_own_last_layer() -> None:
    model = make_ibot(SEPARATE)
    assert model.patch_head is not None and model.patch_head.mlp is model.head.mlp
    assert model.patch_head.last_layer.direction.shape == (7, 5)
    teacher = model.teacher
    assert teacher["patch_head"].mlp is teacher["head"].mlp  # the copy keeps the sharing
    frozen = set(model.frozen_parameters(FakeContext(epoch=0)))
    assert frozen == {*model.head.last_layer.parameters(), *model.patch_head.last_layer.parameters()}
    assert not list(model.frozen_parameters(FakeContext(epoch=1)))


def test_one_step_updates_the_student_and_the_teacher_follows_by_ema() -> None:
    model = make_ibot(ALWAYS_MASKED)
    before = {name: p.detach().clone() for name, p in model.teacher.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ctx = FakeContext(epoch=1, epochs=2, step=0, steps_per_epoch=4)
    optimizer_step(model, random_batch(4, sizes=(16, 16, 8)), optimizer, ctx)
    assert model.mask_token.abs().sum() > 0  # the mask token learns
    momentum = model.cfg.teacher_momentum(0, 8)
    for name, parameter in model.backbone.named_parameters():
        expected = momentum * before[f"backbone.{name}"] + (1 - momentum) * parameter.detach()
        torch.testing.assert_close(model.teacher["backbone"].get_parameter(name), expected)
    assert model.feature_extractor() is model.teacher["backbone"]
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_state_dict_round_trips_and_the_backbone_keys_stay_plain() -> None:
    model = make_ibot(SEPARATE)
    clone = make_ibot(SEPARATE, seed=5)
    clone.load_state_dict(model.state_dict())
    batch = random_batch(3, sizes=(16, 16, 8))
    assert model(batch, FakeContext()).loss.item() == pytest.approx(
        clone(batch, FakeContext()).loss.item(), rel=1e-6
    )
    # The feature extractor's weights load into a freshly built ViT (backbone.pt).
    tiny_vit().load_state_dict(model.feature_extractor().state_dict())


def test_batch_of_padding_keeps_its_masks_per_index() -> None:
    model = make_ibot(ALWAYS_MASKED)
    views = random_batch(3, sizes=(16, 16, 8)).views
    batch = Batch(views=views, labels=None, index=torch.tensor([4, -1, 4]))
    masks = model.masks(batch, 0)
    assert torch.equal(masks[:, 0], masks[:, 2])
