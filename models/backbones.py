"""Backbones by name: (batch, 3, H, W) images → (batch, num_features) pooled features.

``create_backbone("resnet18_small")`` builds one; an unknown name or option fails fast with the known ones.
ResNets are torchvision's (``weights=None``, ``fc`` removed, state-dict keys unchanged); the ``_small``
variants swap the 7×7 stride-2 stem and max-pool for one 3×3 stride-1 convolution so that 32-px images keep
a useful spatial resolution (the usual CIFAR recipe). The ViT is our own DINO-style pre-norm transformer
whose features are the final CLS token and whose position embedding is interpolated to any input size, so
multi-crop views of several resolutions (224/96 or 32/16 px) go through the same model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from clusterssl.errors import ModelError
from clusterssl.models.registry import Registry

# ---------------------------------------------------------------------------------------------- ResNets

TORCHVISION_WIDTHS = (64, 128, 256, 512)


class ResNetBackbone(ResNet):
    """A torchvision ResNet without its classifier: forward gives the (batch, num_features) pooled vector.

    small_stem: 3×3 stride-1 first convolution and no max-pool (for 32-px inputs; 16× more spatial
                positions in every stage than the ImageNet stem).
    widths:     output channels of the stem and of the four stages' blocks before expansion (torchvision:
                64, 128, 256, 512); narrower widths cut the cost roughly with their square.
    first_stride: stride of the first stage (torchvision: 1, the stem has already divided by 4). With the
                small stem, 2 halves the resolution after one full-resolution convolution: 4× fewer
                positions in every stage, which on a CPU buys twice the widths for the same time.
    zero_init_residual: start each residual branch's last BatchNorm at 0, so blocks begin as identities.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        *,
        small_stem: bool = False,
        widths: Sequence[int] = TORCHVISION_WIDTHS,
        first_stride: int = 1,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__(block, list(layers), zero_init_residual=zero_init_residual)
        if tuple(widths) != TORCHVISION_WIDTHS or first_stride != 1:
            self._rebuild_stages(block, layers, tuple(widths), first_stride, zero_init_residual)
        self.num_features: int = widths[-1] * block.expansion
        self.fc = nn.Identity()
        if small_stem:
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()

    def _rebuild_stages(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        widths: tuple[int, ...],
        first_stride: int,
        zero_init_residual: bool,
    ) -> None:
        """Replace the stem and the four stages by ones of other widths or first stride, keeping
        torchvision's module names (so state-dict keys look the same) and its initialisation."""
        if len(widths) != 4 or min(widths) < 1:
            raise ModelError(f"ResNet widths must be 4 positive channel counts, got {list(widths)}")
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=first_stride)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        _init_resnet_weights(self, zero_init_residual)


def _init_resnet_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """torchvision's ResNet initialisation: He-normal convolutions (fan out), unit-scale BatchNorms, and
    optionally a zero scale on each residual branch's last BatchNorm."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)
            elif isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)


def resnet18(*, zero_init_residual: bool = False) -> ResNetBackbone:
    """torchvision ResNet-18, 512 features."""
    return ResNetBackbone(BasicBlock, (2, 2, 2, 2), zero_init_residual=zero_init_residual)


def resnet50(*, zero_init_residual: bool = False) -> ResNetBackbone:
    """torchvision ResNet-50, 2048 features."""
    return ResNetBackbone(Bottleneck, (3, 4, 6, 3), zero_init_residual=zero_init_residual)


def resnet18_small(*, zero_init_residual: bool = False) -> ResNetBackbone:
    """ResNet-18 with a 3×3 stride-1 stem and no max-pool, for 32-px images; 512 features."""
    return ResNetBackbone(BasicBlock, (2, 2, 2, 2), small_stem=True, zero_init_residual=zero_init_residual)


def resnet_tiny(*, zero_init_residual: bool = False) -> ResNetBackbone:
    """A CPU-sized ResNet for 28–64 px images; 256 features, 1.2 M parameters.

    A 3×3 stride-1 stem of 32 channels at full resolution, then four stages of one BasicBlock each
    (32, 64, 128, 256 channels), every stage halving the resolution (28 px → 14, 7, 4, 2). Against
    ``resnet18_small`` it has half the widths, half the blocks and a quarter of the positions per stage,
    so roughly 1/32 of the multiply-adds (docs/results.md#backbones-on-a-cpu has measured speeds).
    """
    return ResNetBackbone(
        BasicBlock,
        (1, 1, 1, 1),
        small_stem=True,
        widths=(32, 64, 128, 256),
        first_stride=2,
        zero_init_residual=zero_init_residual,
    )


def resnet50_small(*, zero_init_residual: bool = False) -> ResNetBackbone:
    """ResNet-50 with a 3×3 stride-1 stem and no max-pool, for 32-px images; 2048 features."""
    return ResNetBackbone(Bottleneck, (3, 4, 6, 3), small_stem=True, zero_init_residual=zero_init_residual)


# -------------------------------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    """Multi-head self-attention over (batch, tokens, dim)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ModelError(f"ViT dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(batch, tokens, dim) → q, k, v each (batch, heads, tokens, head_dim)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split_heads(x)
        # Fused kernel (flash / memory-efficient where available); same result as attention_weights() @ v.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))

    def attention_weights(self, x: Tensor) -> Tensor:
        """(batch, tokens, dim) → (batch, heads, tokens, tokens) softmax attention, rows summing to 1."""
        q, k, _ = self._split_heads(x)
        scale = q.shape[-1] ** -0.5
        return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of samples, rescaling the others."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def without_stochastic_depth(module: nn.Module) -> nn.Module:
    """Set every ``DropPath`` inside ``module`` to drop nothing, in place; returns ``module``.

    For copies that must see whole networks in training mode: DINO's teacher is built without
    stochastic depth (only the student drops paths), although it runs in training mode with the student.
    """
    for layer in module.modules():
        if isinstance(layer, DropPath):
            layer.drop_prob = 0.0
    return module


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT with a CLS token; forward gives the final-normed CLS token, (batch, dim), and
    ``forward_features`` every token, (batch, 1 + patches, dim), optionally with masked patches (iBOT).
    The learned mask token belongs to the method that masks, so the ViT's weights, and every checkpoint
    of it, stay the same whether or not it is pretrained with masks.

    img_size:   the size the position embedding is learned at; other sizes interpolate it (bicubic).
    patch_size: side of the square patches; H and W must be multiples of it.
    drop_path_rate: stochastic depth, rising linearly over the blocks to this value (0 = off).
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ModelError(f"ViT img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.num_features = dim
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_vit_weights)

    def _position_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """(1, 1 + grid_h·grid_w, dim): the learned embedding, patch part resized to the input's grid."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = math.isqrt(patch_pos.shape[1])
        if (grid_h, grid_w) == (side, side):
            return self.pos_embed
        dim = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)], dim=1)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of patches of an H×W input; fails when H or W is not a multiple of the patch."""
        if height % self.patch_size or width % self.patch_size:
            raise ModelError(
                f"ViT input {height}×{width} is not a multiple of the patch size {self.patch_size}"
            )
        return height // self.patch_size, width // self.patch_size

    def tokens(self, images: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """(batch, 3, H, W) → (batch, 1 + patches, dim): CLS token first, position embedding added.

        mask:       optional (batch, patches) bool, row-major over the patch grid; True patches have their
                    embedding replaced by ``mask_token`` (dim,) *before* the position embedding is added,
                    so a masked token still says where it is (iBOT's and BEiT's masked image modelling).
        """
        grid_h, grid_w = self.patch_grid(*images.shape[-2:])
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (batch, patches, dim)
        if mask is not None:
            if mask_token is None:
                raise ValueError("a patch mask needs a mask_token")
            if mask.shape != patches.shape[:2]:
                raise ValueError(f"mask of shape {tuple(mask.shape)} for {tuple(patches.shape[:2])} patches")
            # torch.where even for an all-False mask: the token stays in the graph (DDP expects a grad).
            patches = torch.where(mask.unsqueeze(-1), mask_token.to(patches.dtype), patches)
        cls = self.cls_token.expand(images.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1)
        return x + self._position_embedding(grid_h, grid_w)

    def forward_features(
        self, images: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None
    ) -> Tensor:
        """(batch, 3, H, W) → (batch, 1 + patches, dim): every final-normed token, CLS first, then the
        patches row-major. ``mask``/``mask_token`` as in ``tokens``."""
        x = self.tokens(images, mask, mask_token)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images)[:, 0]

    @torch.no_grad()
    def last_selfattention(self, images: Tensor) -> Tensor:
        """(batch, 3, H, W) → (batch, heads, tokens, tokens): the last block's attention (token 0 = CLS).

        ``[:, :, 0, 1:]`` reshaped to (H/p, W/p) gives DINO's per-head attention maps.
        """
        x = self.tokens(images)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        return last.attn.attention_weights(last.norm1(x))


def _init_vit_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# Named ViT configurations; every VisionTransformer option stays overridable (e.g. ``depth=6`` for a faster
# CPU model, ``drop_path_rate=0.1`` as DINO trains ViT-S).
vit_small = partial(VisionTransformer, img_size=224, patch_size=16, dim=384, depth=12, num_heads=6)
"""ViT-S/16: dim 384, depth 12, 6 heads (DINO's main model); 384 features."""
vit_tiny = partial(VisionTransformer, img_size=224, patch_size=16, dim=192, depth=12, num_heads=3)
"""ViT-Ti/16: dim 192, depth 12, 3 heads; 192 features."""
vit_tiny_p4 = partial(VisionTransformer, img_size=32, patch_size=4, dim=192, depth=12, num_heads=3)
"""ViT-Ti with 4-px patches for 32-px images (8×8 grid; 16-px local crops give 4×4); 192 features."""


# --------------------------------------------------------------------------------------------- registry

BACKBONES: Registry[nn.Module] = Registry(
    "backbone",
    {
        "resnet18": resnet18,
        "resnet50": resnet50,
        "resnet18_small": resnet18_small,
        "resnet50_small": resnet50_small,
        "resnet_tiny": resnet_tiny,
        "vit_small": vit_small,
        "vit_tiny": vit_tiny,
        "vit_tiny_p4": vit_tiny_p4,
    },
)


def create_backbone(name: str, /, **options: Any) -> nn.Module:
    """Build the backbone ``name`` with keyword ``options``; unknown names or options raise ModelError.

    The result maps (batch, 3, H, W) → (batch, num_features) and has a ``num_features`` attribute.
    """
    constructor = BACKBONES[name]
    parameters = inspect.signature(constructor).parameters
    known = {key: p.default for key, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for key, value in options.items():
        if key not in known:
            raise ModelError(
                f"unknown option {key!r} for backbone {name!r}; known: {', '.join(sorted(known))}"
            )
        _check_option_type(name, key, value, known[key])
        _check_option_size(name, key, value)
    settings = {**known, **options}
    grid = settings["img_size"] // settings["patch_size"] if "patch_size" in settings else 0
    if grid > MAX_PATCH_GRID:
        raise ModelError(
            f"backbone {name!r}: img_size / patch_size = {grid} patches a side, more than {MAX_PATCH_GRID}"
        )
    return constructor(**options)


# Sizes far above every published model (ViT-g/14: dim 1408, depth 40, 16 heads; the ImageNet configs here
# use ViT-S/16 and ResNet-50) and far below what exhausts a machine: a typo, or the config of a checkpoint
# from elsewhere, asking for more is refused before anything is allocated.
SIZE_LIMITS: dict[str, float] = {
    "dim": 8192,
    "depth": 128,
    "num_heads": 256,
    "mlp_ratio": 16.0,
    "img_size": 4096,
    "patch_size": 512,
}
MAX_PATCH_GRID = 256
"""Patches along one side of a ViT's training image (ImageNet at 224 px, patch 16: 14)."""


def _check_option_size(name: str, key: str, value: Any) -> None:
    limit = SIZE_LIMITS.get(key)
    if limit is not None and not 0 < value <= limit:
        raise ModelError(f"backbone {name!r} option {key!r} must lie in (0, {limit:g}], got {value!r}")


def _check_option_type(name: str, key: str, value: Any, default: Any) -> None:
    """Options take the type of their default (an int is fine where a float is expected)."""
    expected = type(default)
    ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ModelError(
            f"backbone {name!r} option {key!r} must be of type {expected.__name__}, got {value!r}"
        )


# ------------------------------------------------------------------------------------ multi-crop forward


def embed_views(backbone: nn.Module, views: Sequence[Tensor]) -> Tensor:
    """Run ``backbone`` once per run of consecutive same-size views and stack the features.

    views: list of (batch, 3, H_v, W_v); returns (len(views) · batch, num_features), view-major (rows
    ``v·batch … (v+1)·batch − 1`` belong to view v). Concatenating same-size views makes one large batch per
    resolution (2 globals, then all locals) instead of one small batch per view, as SwAV and DINO do.
    """
    features: list[Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        group = views[start] if end == start + 1 else torch.cat(list(views[start:end]), dim=0)
        features.append(backbone(group))
        start = end
    return features[0] if len(features) == 1 else torch.cat(features, dim=0)
