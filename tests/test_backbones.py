"""Backbones: shapes at the sizes multi-crop uses, the registry's errors, ViT attention, grouped forward."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from clusterssl.errors import ModelError
from clusterssl.models.backbones import BACKBONES, VisionTransformer, create_backbone, embed_views

EXPECTED_FEATURES = {
    "resnet18": 512,
    "resnet50": 2048,
    "resnet18_small": 512,
    "resnet50_small": 2048,
    "resnet_tiny": 256,
    "vit_small": 384,
    "vit_tiny": 192,
    "vit_tiny_p4": 192,
}
# Sizes each backbone must accept: global and local crop sizes for its intended data (multiples of the
# ViTs' patch sizes, including a non-square one).
SIZES = {
    "resnet18": [(32, 48)],
    "resnet50": [(32, 32)],
    "resnet18_small": [(32, 32), (16, 16)],
    "resnet50_small": [(32, 32), (16, 16)],
    "resnet_tiny": [(28, 28), (32, 32), (64, 64), (16, 16)],
    "vit_small": [(32, 32), (48, 48), (32, 64)],
    "vit_tiny": [(32, 32), (16, 16)],
    "vit_tiny_p4": [(32, 32), (16, 16), (12, 20)],
}


def test_every_registered_backbone_is_covered() -> None:
    assert set(BACKBONES) == set(EXPECTED_FEATURES) == set(SIZES)


@functools.cache
def built(name: str) -> nn.Module:
    """One seeded instance per name, shared by the tests that only read it."""
    torch.manual_seed(0)
    return create_backbone(name).eval()


@pytest.mark.parametrize("name", sorted(EXPECTED_FEATURES))
def test_pooled_features_shape(name: str) -> None:
    backbone = built(name)
    assert backbone.num_features == EXPECTED_FEATURES[name]
    with torch.no_grad():
        for height, width in SIZES[name]:
            features = backbone(torch.randn(2, 3, height, width))
            assert features.shape == (2, EXPECTED_FEATURES[name])
            assert torch.isfinite(features).all()
            # Different images give different features (the output is not a constant).
            assert not torch.allclose(features[0], features[1])


def test_unknown_backbone_lists_the_known_names() -> None:
    with pytest.raises(ModelError) as error:
        create_backbone("resnt50")
    assert str(error.value) == (
        "unknown backbone 'resnt50'; known: resnet18, resnet18_small, resnet50, resnet50_small, "
        "resnet_tiny, vit_small, vit_tiny, vit_tiny_p4"
    )


def test_unknown_or_mistyped_option_is_one_clear_error() -> None:
    with pytest.raises(
        ModelError, match=r"unknown option 'depht' for backbone 'vit_tiny_p4'; known: .*depth"
    ):
        create_backbone("vit_tiny_p4", depht=6)
    with pytest.raises(ModelError, match="option 'depth' must be of type int, got '6'"):
        create_backbone("vit_tiny_p4", depth="6")
    assert len(create_backbone("vit_tiny_p4", depth=2).blocks) == 2


def test_small_stem_keeps_resolution_for_32px_images() -> None:
    def final_map_size(name: str) -> tuple[int, int]:
        backbone = create_backbone(name).eval()
        shapes: list[tuple[int, ...]] = []
        backbone.layer4.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
        with torch.no_grad():
            backbone(torch.randn(1, 3, 32, 32))
        return shapes[0][-2:]

    # The 3×3 stride-1 stem without max-pool divides 32 px by 8 (three stride-2 stages) instead of 32.
    assert final_map_size("resnet18_small") == (4, 4)
    assert final_map_size("resnet18") == (1, 1)
    small = create_backbone("resnet18_small")
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity) and isinstance(small.fc, nn.Identity)


def test_tiny_resnet_halves_the_resolution_in_every_stage_after_a_full_resolution_stem() -> None:
    backbone = create_backbone("resnet_tiny").eval()
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        getattr(backbone, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
    with torch.no_grad():
        backbone(torch.randn(1, 3, 28, 28))
    assert shapes == {
        "conv1": (1, 32, 28, 28),
        "layer1": (1, 32, 14, 14),
        "layer2": (1, 64, 7, 7),
        "layer3": (1, 128, 4, 4),
        "layer4": (1, 256, 2, 2),
    }
    assert isinstance(backbone.maxpool, nn.Identity) and isinstance(backbone.fc, nn.Identity)
    stages = (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
    assert [len(stage) for stage in stages] == [1, 1, 1, 1]  # one BasicBlock per stage
    # About a ninth of ResNet-18's parameters: 1,227,488 against 11,176,512 (both without a classifier).
    assert sum(p.numel() for p in backbone.parameters()) == 1_227_488


def test_tiny_resnet_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("resnet_tiny").train()
    backbone(torch.randn(4, 3, 28, 28)).square().mean().backward()
    for name, parameter in backbone.named_parameters():
        assert parameter.grad is not None and torch.count_nonzero(parameter.grad) > 0, name


def test_tiny_resnet_state_dict_round_trips_and_keeps_torchvision_names() -> None:
    torch.manual_seed(0)
    source = create_backbone("resnet_tiny").eval()
    torch.manual_seed(1)
    target = create_backbone("resnet_tiny").eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(source(images), target(images))
        target.load_state_dict(source.state_dict())
        torch.testing.assert_close(target(images), source(images))
    # Module names are torchvision's, so tools that read ResNet checkpoints by key find the same layout.
    keys = set(source.state_dict())
    assert {
        "conv1.weight",
        "layer1.0.conv1.weight",
        "layer2.0.downsample.0.weight",
        "layer4.0.bn2.bias",
    } <= keys
    assert "layer1.1.conv1.weight" not in keys and not any(key.startswith("fc.") for key in keys)


def test_zero_init_residual_also_applies_to_rebuilt_stages() -> None:
    backbone = create_backbone("resnet_tiny", zero_init_residual=True)
    assert all(torch.count_nonzero(layer[0].bn2.weight) == 0 for layer in (backbone.layer1, backbone.layer4))
    assert torch.count_nonzero(create_backbone("resnet_tiny").layer1[0].bn2.weight) > 0


def test_zero_init_residual_zeroes_the_last_norm_of_every_block() -> None:
    backbone = create_backbone("resnet18_small", zero_init_residual=True)
    gammas = [block.bn2.weight for layer in (backbone.layer1, backbone.layer2) for block in layer]
    assert all(torch.count_nonzero(g) == 0 for g in gammas)
    assert torch.count_nonzero(create_backbone("resnet18_small").layer1[0].bn2.weight) > 0
    bottleneck = create_backbone("resnet50", zero_init_residual=True).layer1[0]
    assert torch.count_nonzero(bottleneck.bn3.weight) == 0


def test_resnet_state_dict_keys_are_torchvision_keys_without_fc() -> None:
    from torchvision.models import resnet18

    ours = set(create_backbone("resnet18").state_dict())
    assert ours == {key for key in resnet18(weights=None).state_dict() if not key.startswith("fc.")}


# ------------------------------------------------------------------------------------------------ ViT


def tiny_vit(**options: object) -> VisionTransformer:
    torch.manual_seed(0)
    return create_backbone("vit_tiny_p4", depth=2, **options).eval()


def test_vit_attention_shapes_and_rows_sum_to_one() -> None:
    vit = tiny_vit()
    for height, width in [(32, 32), (16, 16), (8, 24)]:
        tokens = 1 + (height // 4) * (width // 4)
        attention = vit.last_selfattention(torch.randn(3, 3, height, width))
        assert attention.shape == (3, 3, tokens, tokens)  # (batch, heads, tokens, tokens)
        assert (attention >= 0).all()
        torch.testing.assert_close(attention.sum(dim=-1), torch.ones(3, 3, tokens))
    assert vit.patch_size == 4


def test_vit_reported_attention_is_the_one_the_last_block_uses() -> None:
    # Recompute the last block by hand from last_selfattention's weights: it must match the fused forward.
    vit = tiny_vit()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        x = vit.tokens(images)
        for block in vit.blocks[:-1]:
            x = block(x)
        last = vit.blocks[-1]
        attention = vit.last_selfattention(images)  # (batch, heads, tokens, tokens)
        _, _, v = last.attn._split_heads(last.norm1(x))
        mixed = (attention @ v).transpose(1, 2).flatten(2)
        x = x + last.attn.proj(mixed)
        x = x + last.mlp(last.norm2(x))
        torch.testing.assert_close(vit.norm(x)[:, 0], vit(images), rtol=1e-5, atol=1e-5)


def test_vit_position_embedding_is_used_as_learned_at_its_size_and_resized_otherwise() -> None:
    vit = tiny_vit()
    assert vit._position_embedding(8, 8) is vit.pos_embed  # 32 px / 4 = the learned 8×8 grid
    resized = vit._position_embedding(4, 6)
    assert resized.shape == (1, 1 + 24, 192)
    torch.testing.assert_close(resized[:, 0], vit.pos_embed[:, 0])  # CLS position kept
    # Bicubic resizing of a constant grid is that constant.
    with torch.no_grad():
        vit.pos_embed[:, 1:] = 0.5
    torch.testing.assert_close(vit._position_embedding(4, 6)[:, 1:], torch.full((1, 24, 192), 0.5))


def test_vit_rejects_sizes_that_are_not_multiples_of_the_patch() -> None:
    with pytest.raises(ModelError, match=r"30×30 is not a multiple of the patch size 4"):
        tiny_vit()(torch.randn(1, 3, 30, 30))


def test_vit_init_is_truncated_normal_with_zero_bias() -> None:
    vit = built("vit_small")
    weights = torch.cat([block.attn.qkv.weight.flatten() for block in vit.blocks])
    assert abs(weights.std().item() - 0.02) < 0.001
    assert all(torch.count_nonzero(block.mlp[0].bias) == 0 for block in vit.blocks)
    assert vit.pos_embed.abs().max() <= 2.0 and vit.pos_embed.std().item() == pytest.approx(0.02, abs=0.002)


def test_drop_path_only_acts_in_training() -> None:
    vit = tiny_vit(drop_path_rate=0.5)
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(vit(images), vit(images))
        vit.train()
        torch.manual_seed(1)
        first = vit(images)
        torch.manual_seed(2)
        assert not torch.allclose(first, vit(images))


# ------------------------------------------------------------------------------------ grouped forward


class CountingBackbone(nn.Module):
    """Records the batch shapes it is called with; features are per-image means of a linear map."""

    def __init__(self) -> None:
        super().__init__()
        self.num_features = 4
        self.linear = nn.Linear(3, 4)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, images: Tensor) -> Tensor:
        self.calls.append(tuple(images.shape))
        return self.linear(images.mean(dim=(2, 3)))


def test_embed_views_runs_once_per_resolution_and_keeps_view_order() -> None:
    backbone = CountingBackbone()
    views = [torch.randn(5, 3, size, size) for size in (16, 16, 8, 8, 8)]
    features = embed_views(backbone, views)
    assert backbone.calls == [(10, 3, 16, 16), (15, 3, 8, 8)]
    expected = torch.cat([backbone.linear(view.mean(dim=(2, 3))) for view in views])
    torch.testing.assert_close(features, expected)
    assert features.shape == (25, 4)


def test_embed_views_with_a_vit_equals_one_call_per_view() -> None:
    vit = tiny_vit()
    views = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    with torch.no_grad():
        torch.testing.assert_close(
            embed_views(vit, views), torch.cat([vit(view) for view in views]), rtol=1e-5, atol=1e-5
        )


def test_attention_maps_are_the_cls_rows_on_the_patch_grid_and_plot(tmp_path: Path) -> None:
    from clusterssl.pipeline.tracking.plots import attention_maps, plot_attention_maps

    vit = tiny_vit()
    images = torch.randn(2, 3, 8, 12)  # a 2 × 3 grid of 4-px patches
    maps = attention_maps(vit, images)
    attention = vit.last_selfattention(images)
    assert maps.shape == (2, 3, 2, 3)  # (batch, heads, grid_h, grid_w)
    # Row-major patches: map[b, h, i, j] is the CLS token's attention to patch i * 3 + j (token 1 + …).
    torch.testing.assert_close(maps[1, 2, 1, 0], attention[1, 2, 0, 1 + 3])
    # What the CLS token does not give itself, it gives the patches.
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), 1 - attention[:, :, 0, 0])
    png = plot_attention_maps(images, maps, tmp_path / "attention.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
