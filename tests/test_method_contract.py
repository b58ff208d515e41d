"""The Method contract as every method keeps it: checkpoint keys that do not move, and no attribute that
a hook or a step adds after ``__init__``."""

from __future__ import annotations

import pytest
import torch
from fakes import FakeContext, TinyBackbone, optimizer_step, random_batch

from clusterssl.models.factory import METHODS
from clusterssl.models.method import Method

BACKBONE = ["backbone.linear.bias", "backbone.linear.weight"]
PROJECTION_BN = [
    "projection.mlp.0.bias",
    "projection.mlp.0.weight",
    "projection.mlp.1.bias",
    "projection.mlp.1.num_batches_tracked",
    "projection.mlp.1.running_mean",
    "projection.mlp.1.running_var",
    "projection.mlp.1.weight",
    "projection.mlp.3.bias",
    "projection.mlp.3.weight",
]
DINO_HEAD = [
    "last_layer.direction",
    "last_layer.magnitude",
    "mlp.0.bias",
    "mlp.0.weight",
    "mlp.2.bias",
    "mlp.2.weight",
    "mlp.4.bias",
    "mlp.4.weight",
]
PCL_PROJECTION = ["mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"]

STATE_KEYS = {
    "swav": [*BACKBONE, *PROJECTION_BN, "prototypes.weight", "queue", "queue_filled"],
    "dino": [
        *BACKBONE,
        *(f"head.{key}" for key in DINO_HEAD),
        "loss_fn.center",
        "teacher_backbone.linear.bias",
        "teacher_backbone.linear.weight",
        *(f"teacher_head.{key}" for key in DINO_HEAD),
    ],
    "deepcluster": [*BACKBONE, "classifier.bias", "classifier.weight", "clusterings_done", "pseudo_labels"],
    "deepcluster_v2": [
        *BACKBONE,
        *PROJECTION_BN,
        "assignments",
        "memory",
        "memory_filled",
        "prototypes_0",
        "prototypes_1",
        "prototypes_2",
        "sample_labels",
    ],
    "pcl": [
        *BACKBONE,
        *(f"{key}_{j}" for key in ("centroids", "cluster_ids", "phi") for j in range(3)),
        "clustering_ready",
        "key_encoder.backbone.linear.bias",
        "key_encoder.backbone.linear.weight",
        *(f"key_encoder.head.{key}" for key in PCL_PROJECTION),
        *(f"projection.{key}" for key in PCL_PROJECTION),
        "queue",
        "steps_done",
    ],
}
"""The state_dict keys of each method with its default config on ``TinyBackbone``, as checkpoints
written so far hold them."""

SMALL = {
    "swav": {"num_prototypes": 5, "queue_length": 8, "epoch_queue_starts": 0},
    "dino": {"out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 4},
    "deepcluster": {"num_clusters": 4, "pca_dim": 4},
    "deepcluster_v2": {"num_prototypes": (3, 4, 5), "hidden_dim": 8, "feat_dim": 4},
    "pcl": {"num_clusters": (3, 4, 5), "warmup_epochs": 0, "queue_length": 8, "num_negatives": 2},
}


def build(name: str, **settings: object) -> Method:
    torch.manual_seed(0)
    method_class = METHODS[name]
    return method_class(TinyBackbone(), method_class.config_class(**settings))


@pytest.mark.parametrize("name", sorted(STATE_KEYS))
def test_state_dict_keys_are_the_ones_checkpoints_hold(name: str) -> None:
    assert sorted(build(name).state_dict()) == sorted(STATE_KEYS[name])
    assert sorted(build(name, **SMALL[name]).state_dict()) == sorted(STATE_KEYS[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_hooks_and_steps_add_no_attribute(name: str) -> None:
    method = build(name, **SMALL[name])
    before = set(vars(method)) | {name for name, _ in method.named_children()}
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ctx = FakeContext(epochs=1, steps_per_epoch=2, num_samples=12, images=images)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    method.on_train_start(ctx)
    method.on_epoch_start(ctx)
    for step in range(2):
        ctx.step = step
        batch = random_batch(4, seed=step)
        batch.index = torch.tensor([0, 3, 5, 10]) + step
        optimizer_step(method, batch, optimizer, ctx)
    assert set(vars(method)) | {name for name, _ in method.named_children()} == before
