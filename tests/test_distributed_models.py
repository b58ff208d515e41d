"""Two real processes (gloo, CPU): the distributed pieces equal one process on the concatenated batch.

One spawn serves every test in the file (starting processes is the slow part): each rank computes its
share and saves it; the tests compare the saved results with a single-process computation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import gloo_process_group, load_rank_results, run_ranks
from fakes import FakeContext, TinyBackbone

from clusterssl.models import collectives
from clusterssl.models.backbones import create_backbone
from clusterssl.models.dino import DINOLoss
from clusterssl.models.ibot import IBOT, IBOTConfig
from clusterssl.models.sinkhorn import sinkhorn
from clusterssl.models.swav import SwAV, SwAVConfig
from clusterssl.models.types import Batch

WORLD_SIZE = 2
LOCAL_BATCH = 6
PROTOTYPES = 7
OUT_DIM = 5
UNEQUAL_SPLIT = 9
TIMEOUT_S = 120


def global_inputs() -> dict[str, torch.Tensor]:
    """The same global tensors on every rank (seeded); rank r takes rows r·LOCAL_BATCH … (r+1)·LOCAL_BATCH."""
    generator = torch.Generator().manual_seed(0)
    rows = WORLD_SIZE * LOCAL_BATCH
    z = F.normalize(torch.randn(rows, 16, generator=generator), dim=1)
    c = F.normalize(torch.randn(PROTOTYPES, 16, generator=generator), dim=1)
    return {
        "scores": z @ c.t(),
        "student": torch.randn(4, rows, OUT_DIM, generator=generator),
        "teacher": torch.randn(2, rows, OUT_DIM, generator=generator),
        "center": torch.randn(1, OUT_DIM, generator=generator),
    }


def ibot_model() -> IBOT:
    """The same tiny iBOT on every rank (seeded), masking every global crop."""
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_p4", img_size=16, depth=1, dim=16, num_heads=2)
    return IBOT(vit, IBOTConfig(out_dim=OUT_DIM, hidden_dim=16, bottleneck_dim=8, mask_share=1.0))


def ibot_batch() -> Batch:
    """The global batch: 2 × 16 px global and one 8 px local crop of WORLD_SIZE · LOCAL_BATCH samples."""
    generator = torch.Generator().manual_seed(1)
    rows = WORLD_SIZE * LOCAL_BATCH
    views = [torch.randn(rows, 3, size, size, generator=generator) for size in (16, 16, 8)]
    return Batch(views=views, labels=None, index=torch.arange(100, 100 + rows))


IBOT_GRADIENTS = ("mask_token", "backbone.patch_embed.weight", "head.last_layer.direction")


def ibot_step(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Loss, both centres and a few gradients after one forward/backward (model may be DDP-wrapped)."""
    output = model(batch, FakeContext())
    output.loss.backward()
    plain = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    parameters = dict(plain.named_parameters())
    return {
        "loss": output.loss.detach(),
        "center": plain.cls_loss.center.clone(),
        "patch_center": plain.patch_center.center.clone(),
        **{name: parameters[name].grad.clone() for name in IBOT_GRADIENTS},
    }


def rank_rows(tensor: torch.Tensor, rank: int, dim: int = 0) -> torch.Tensor:
    return tensor.narrow(dim, rank * LOCAL_BATCH, LOCAL_BATCH)


def worker(rank: int, init_file: str, out_dir: str) -> None:
    with gloo_process_group(rank, init_file, WORLD_SIZE, TIMEOUT_S):
        inputs = global_inputs()
        results: dict[str, Any] = {"world_size": collectives.world_size(), "rank": collectives.rank()}
        local_scores = rank_rows(inputs["scores"], rank)
        results["codes"] = sinkhorn(local_scores, epsilon=0.05, iterations=3)
        results["codes_local_only"] = sinkhorn(local_scores, epsilon=0.05, iterations=3, distribute=False)
        results["gathered"] = collectives.all_gather_cat(local_scores)
        # Unequal shares: rank 0 takes the first UNEQUAL_SPLIT rows, rank 1 the rest.
        unequal = inputs["scores"][:UNEQUAL_SPLIT] if rank == 0 else inputs["scores"][UNEQUAL_SPLIT:]
        results["codes_unequal"] = sinkhorn(unequal, epsilon=0.05, iterations=3)

        loss_fn = DINOLoss(OUT_DIM, student_temp=0.1, center_momentum=0.9)
        loss_fn.center.copy_(inputs["center"])
        student = list(rank_rows(inputs["student"], rank, dim=1))
        teacher = list(rank_rows(inputs["teacher"], rank, dim=1))
        results["dino_loss"] = loss_fn(student, teacher, teacher_temp=0.04)
        results["center"] = loss_fn.center.clone()

        whole = ibot_batch()
        local = Batch(
            views=[rank_rows(view, rank) for view in whole.views],
            labels=None,
            index=rank_rows(whole.index, rank),
        )
        ddp = torch.nn.parallel.DistributedDataParallel(ibot_model())
        results["ibot"] = ibot_step(ddp, local)

        swav = SwAV(TinyBackbone(), SwAVConfig(queue_length=20, feat_dim=4, hidden_dim=8, num_prototypes=3))
        results["queue_rows"] = swav.local_queue_length(LOCAL_BATCH)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ddp")
    run_ranks(worker, (str(tmp / "init"), str(tmp)), WORLD_SIZE, TIMEOUT_S)
    return load_rank_results(tmp, WORLD_SIZE)


def test_helpers_see_the_process_group(rank_results: list[dict[str, Any]]) -> None:
    assert [r["world_size"] for r in rank_results] == [2, 2]
    assert [r["rank"] for r in rank_results] == [0, 1]
    scores = global_inputs()["scores"]
    for result in rank_results:
        assert torch.equal(result["gathered"], scores)  # every rank holds all rows in rank order


def test_helpers_are_identities_in_one_process() -> None:
    assert collectives.world_size() == 1 and collectives.rank() == 0
    tensor = torch.arange(4.0)
    assert collectives.all_reduce_sum(tensor) is tensor and torch.equal(tensor, torch.arange(4.0))
    assert collectives.all_gather_cat(tensor) is tensor


def test_distributed_sinkhorn_equals_one_process_on_the_concatenated_batch(
    rank_results: list[dict[str, Any]],
) -> None:
    scores = global_inputs()["scores"]
    expected = sinkhorn(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(torch.cat([r["codes"] for r in rank_results]), expected, rtol=1e-5, atol=1e-7)
    # The equality is not an accident of the data: each rank alone gives different codes.
    local = torch.cat([r["codes_local_only"] for r in rank_results])
    assert not torch.allclose(local, expected, atol=1e-3)


def test_distributed_sinkhorn_counts_the_global_batch_when_ranks_hold_different_rows(
    rank_results: list[dict[str, Any]],
) -> None:
    scores = global_inputs()["scores"]
    expected = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert [r["codes_unequal"].shape[0] for r in rank_results] == [UNEQUAL_SPLIT, 12 - UNEQUAL_SPLIT]
    got = torch.cat([r["codes_unequal"] for r in rank_results])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_distributed_dino_center_equals_one_process_on_the_concatenated_batch(
    rank_results: list[dict[str, Any]],
) -> None:
    inputs = global_inputs()
    loss_fn = DINOLoss(OUT_DIM, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(inputs["center"])
    loss = loss_fn(list(inputs["student"]), list(inputs["teacher"]), teacher_temp=0.04)
    for result in rank_results:
        torch.testing.assert_close(result["center"], loss_fn.center, rtol=1e-6, atol=1e-7)
    # Each rank's loss is its local mean (DDP averages gradients), so their mean is the global loss.
    torch.testing.assert_close(torch.stack([r["dino_loss"] for r in rank_results]).mean(), loss)


def test_swav_queue_rows_split_the_rounded_global_length(rank_results: list[dict[str, Any]]) -> None:
    # queue_length 20, global batch 2 × 6 = 12 → 12 rows in all, 6 per rank.
    assert [r["queue_rows"] for r in rank_results] == [6, 6]


def test_distributed_ibot_equals_one_process_on_the_concatenated_batch(
    rank_results: list[dict[str, Any]],
) -> None:
    """Under DDP (2 gloo ranks) iBOT's centres, averaged gradients and mean loss are one process's."""
    expected = ibot_step(ibot_model(), ibot_batch())
    losses = torch.stack([r["ibot"]["loss"] for r in rank_results])
    torch.testing.assert_close(losses.mean(), expected["loss"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(losses[0], losses[1])  # the ranks did see different halves
    for result in rank_results:
        for name in ("center", "patch_center", *IBOT_GRADIENTS):
            torch.testing.assert_close(result["ibot"][name], expected[name], rtol=1e-4, atol=1e-6)
