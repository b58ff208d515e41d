"""Similarity logits divided by small temperatures stay float32 under bf16 autocast (CPU autocast here):
the loss of one step in bf16 is close to the fp32 loss, and much closer than with the same final matmul
left to autocast."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterssl.models.heads import DINOHead, Prototypes
from clusterssl.models.pcl import info_nce_logits

BATCH = 64


def soft_cross_entropy(logits: Tensor, temperature: float, targets: Tensor) -> Tensor:
    """The losses' shape: cross-entropy of softmax(logits / τ) against fixed target distributions,
    per sample (a batch mean would let the rounding errors of different samples cancel)."""
    return -(targets * F.log_softmax(logits.float() / temperature, dim=-1)).sum(dim=-1)


@torch.no_grad()
def loss_gaps(loss: Callable[[bool], Tensor]) -> tuple[float, float]:
    """Mean per-sample |bf16 − fp32| loss with the module as it is, and with its last matmul left to
    autocast (``loss(plain)``: True runs that plain variant)."""
    reference = loss(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fixed, plain = loss(False), loss(True)
    return float((fixed - reference).abs().mean()), float((plain - reference).abs().mean())


def test_dino_last_layer_logits_over_0_04() -> None:
    torch.manual_seed(0)
    layer = DINOHead(32, 4096, hidden_dim=64, bottleneck_dim=256, norm_last_layer=False).last_layer
    # bottleneck vectors (unit, as the head makes them) near some output rows: logits near 1
    weight = layer.weight.detach()
    bottleneck = F.normalize(
        weight[:BATCH] / weight[:BATCH].norm(dim=1, keepdim=True) + 0.5 * torch.randn(BATCH, 256) / 16, dim=1
    )
    targets = F.softmax(torch.randn(BATCH, 4096) * 3, dim=-1)

    def loss(plain: bool) -> Tensor:
        logits = bottleneck @ layer.weight.t() if plain else layer(bottleneck)
        return soft_cross_entropy(logits, 0.04, targets)

    fixed, plain = loss_gaps(loss)
    assert fixed < 1e-3 and fixed * 4 < plain, (fixed, plain)


def test_swav_prototype_scores_over_0_1() -> None:
    torch.manual_seed(1)
    prototypes = Prototypes(128, 3000)
    prototypes.normalize_()
    # embeddings near their prototypes: scores near 1, where bf16 is coarsest
    z = F.normalize(prototypes.weight.detach()[:BATCH] + 0.3 * torch.randn(BATCH, 128), dim=1)
    targets = F.softmax(torch.randn(BATCH, 3000) * 3, dim=-1)

    def loss(plain: bool) -> Tensor:
        scores = z @ prototypes.weight.t() if plain else prototypes(z)
        return soft_cross_entropy(scores, 0.1, targets)

    fixed, plain = loss_gaps(loss)
    assert fixed < 1e-3 and fixed * 4 < plain, (fixed, plain)


def test_pcl_info_nce_logits_over_0_2() -> None:
    torch.manual_seed(2)
    q = F.normalize(torch.randn(BATCH, 128), dim=1)
    k = F.normalize(q + 0.2 * torch.randn(BATCH, 128), dim=1)
    queue = F.normalize(torch.randn(4096, 128), dim=1)

    def loss(plain: bool) -> Tensor:
        if plain:
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.2
        else:
            logits, _ = info_nce_logits(q, k, queue, 0.2)
        return F.cross_entropy(logits.float(), torch.zeros(BATCH, dtype=torch.long), reduction="none")

    fixed, plain = loss_gaps(loss)
    assert fixed < 1e-3 and fixed * 4 < plain, (fixed, plain)
