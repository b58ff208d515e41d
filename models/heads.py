"""Heads on top of pooled backbone features: SwAV's projection MLP and prototypes, DINO's head.

Kept apart from the backbones (timm's ``forward_features`` split), so that evaluation uses the backbone
alone and a method owns its heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterssl.models.fp32 import fp32_matmul


class ProjectionHead(nn.Module):
    """MLP ``in_dim → hidden_dim (→ BN) → ReLU … → out_dim``; SwAV's is 2048 → 2048 BN ReLU → 128.

    num_layers: linear layers in total (≥ 1); every one but the last is followed by BN (optional) and ReLU.
    Input (batch, in_dim), output (batch, out_dim), not normalised (the method L2-normalises).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batch_norm: bool = True
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"ProjectionHead needs num_layers >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden_dim))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = True) -> ProjectionHead:
    """The methods' projection head: ``in_dim → hidden_dim → out_dim`` (2 layers), or one linear layer
    ``in_dim → out_dim`` when ``hidden_dim`` is 0 (the configs' way to ask for a linear head)."""
    if hidden_dim:
        return ProjectionHead(in_dim, hidden_dim, out_dim, num_layers=2, batch_norm=batch_norm)
    return ProjectionHead(in_dim, in_dim, out_dim, num_layers=1)


class Prototypes(nn.Module):
    """K learnable prototype vectors of size ``dim``: (batch, dim) → (batch, K) scores ``x · cᵀ``.

    A bias-free linear layer; ``normalize_()`` L2-normalises its rows in place (SwAV does this, without
    gradient, at the start of every step so that scores of unit inputs are cosine similarities).
    """

    def __init__(self, dim: int, num_prototypes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        # nn.Linear's default init, so that the first normalisation starts from the same distribution.
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @property
    def num_prototypes(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return fp32_matmul(x, self.weight.t())  # scores ÷ a small temperature: see models/fp32.py

    @torch.no_grad()
    def normalize_(self) -> None:
        """Scale every prototype row to unit L2 norm, in place and outside autograd."""
        self.weight.copy_(F.normalize(self.weight, dim=1))


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``W = g · V / ‖V‖`` per output row (Salimans & Kingma).

    ``direction`` V is (out_dim, in_dim); ``magnitude`` g is (out_dim, 1), initialised to 1. With
    ``fixed_magnitude`` g gets no gradient and stays 1, so every row of W has unit norm (DINO's
    ``norm_last_layer``, which keeps training stable). Our own small module rather than
    ``torch.nn.utils.weight_norm`` (deprecated) or the parametrization API (whose deep copies and state-dict
    keys are less plain).
    """

    def __init__(self, in_dim: int, out_dim: int, *, fixed_magnitude: bool = True) -> None:
        super().__init__()
        self.direction = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.direction, a=5**0.5)
        self.magnitude = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_magnitude)

    @property
    def weight(self) -> Tensor:
        """(out_dim, in_dim) effective weight, each row of norm ``magnitude``."""
        return self.magnitude * F.normalize(self.direction, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return fp32_matmul(x, self.weight.t())  # DINO's logits ÷ 0.04: see models/fp32.py


class DINOHead(nn.Module):
    """DINO's projection head: (batch, in_dim) → (batch, out_dim) logits.

    A ``num_layers``-layer MLP with GELU (hidden 2048, BN optional) down to a ``bottleneck_dim`` (256)
    vector, L2-normalised, then ``last_layer``: a weight-normalised linear map to ``out_dim`` (65536)
    without bias, whose row norms stay 1 when ``norm_last_layer``. The MLP's linear layers start from a
    truncated normal (std 0.02) with zero bias. ``last_layer`` is exposed so that the method can drop its
    gradients during the first epoch.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DINOHead needs num_layers >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_magnitude=norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        bottleneck = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(bottleneck)


class NormalizedEmbedding(nn.Module):
    """``backbone → head → L2-normalise``: (batch, 3, H, W) → (batch, out_dim) unit vectors.

    PCL's momentum encoder is one (its own copies of the backbone and head); DeepCluster-v2 wraps its
    backbone and projection in one on the fly, to hand the extraction pass a single module.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)
