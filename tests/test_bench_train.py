"""``clusterssl bench train``: the synthetic batch, the bare baseline's loss, the step path, the summary's
arithmetic and the CLI (tiny ViT, a few steps: the figures themselves are not checked)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from fakes import FakeContext

from clusterssl.errors import ModelError, PipelineError
from clusterssl.models.backbones import create_backbone
from clusterssl.models.dino import DINO, DINOConfig
from clusterssl.pipeline.data.spec import MultiCropSpec
from clusterssl.tools.bench_train import (
    BareBackbone,
    method_settings_from_overrides,
    run_benchmark,
    synthetic_batch,
    time_training,
)
from clusterssl.tools.cli import cli

TINY_VIT = {"depth": 1, "dim": 16, "num_heads": 2}
SPEC = MultiCropSpec.preset("dino", global_size=16, local_size=8, num_local=2)
SMALL_METHODS = [
    "swav.hidden_dim=16",
    "swav.feat_dim=8",
    "swav.num_prototypes=10",
    "dino.out_dim=32",
    "dino.hidden_dim=16",
    "dino.bottleneck_dim=8",
]


def test_synthetic_batch_has_the_specs_views_and_is_seeded() -> None:
    batch = synthetic_batch(SPEC, 5, torch.device("cpu"), seed=1)
    assert [tuple(v.shape) for v in batch.views] == [(5, 3, 16, 16)] * 2 + [(5, 3, 8, 8)] * 2
    assert batch.num_global == 2 and batch.labels is None
    assert batch.index.tolist() == [0, 1, 2, 3, 4]
    again = synthetic_batch(SPEC, 5, torch.device("cpu"), seed=1)
    other = synthetic_batch(SPEC, 5, torch.device("cpu"), seed=2)
    assert all(torch.equal(a, b) for a, b in zip(batch.views, again.views, strict=True))
    assert not torch.equal(batch.views[0], other.views[0])


def test_bare_backbone_loss_is_the_mean_square_of_every_views_features() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_p4", **TINY_VIT)
    batch = synthetic_batch(SPEC, 3, torch.device("cpu"), seed=0)
    expected = torch.cat([backbone(view) for view in batch.views]).square().mean()
    torch.testing.assert_close(BareBackbone(backbone)(batch, FakeContext()).loss, expected)


def test_time_training_takes_warmup_plus_steps_optimizer_steps_with_the_methods_hooks() -> None:
    """DINO at the steady position (epoch 50 of 100): its last layer is not frozen, so it moves, and
    the teacher follows by EMA after every step; the context ends warmup + steps steps later."""
    torch.manual_seed(0)
    method = DINO(
        create_backbone("vit_tiny_p4", **TINY_VIT), DINOConfig(out_dim=12, hidden_dim=8, bottleneck_dim=4)
    )
    last_before = method.head.last_layer.direction.detach().clone()
    teacher_before = method.teacher_head.mlp[0].weight.detach().clone()
    batch = synthetic_batch(SPEC, 4, torch.device("cpu"), seed=0)
    timing = time_training(
        method,
        batch,
        optimizer_name="sgd",
        precision="fp32",
        steps=2,
        warmup=1,
        bank_images=torch.zeros(4, 3, 16, 16),
    )
    assert timing.steps == 2
    assert timing.images_per_s == pytest.approx(4 / timing.seconds_per_step)
    assert not torch.equal(method.head.last_layer.direction, last_before)
    assert not torch.equal(method.teacher_head.mlp[0].weight, teacher_before)


def test_method_settings_parse_and_refuse_unknown_methods() -> None:
    settings = method_settings_from_overrides(["swav", "dino"], ["swav.num_prototypes=10", "dino.out_dim=8"])
    assert settings == {"swav": {"num_prototypes": 10}, "dino": {"out_dim": 8}}
    # Settings of a registered method that is not benchmarked this time are ignored ...
    assert method_settings_from_overrides(["swav"], ["dino.out_dim=8"]) == {"swav": {}}
    # ... a name that is no method is refused.
    with pytest.raises(PipelineError, match="not a method"):
        method_settings_from_overrides(["swav"], ["swaav.out_dim=8"])


def tiny_benchmark(methods: list[str], overrides: list[str], **options: Any) -> dict[str, Any]:
    """``run_benchmark`` on the tiny ViT and 16/8 px views, one timed step unless ``options`` say more."""
    settings: dict[str, Any] = dict(
        backbone="vit_tiny_p4",
        backbone_kwargs=TINY_VIT,
        spec=SPEC,
        batch_size=4,
        steps=1,
        warmup=0,
        device=torch.device("cpu"),
        precision="auto",
        optimizer="sgd",
    )
    return run_benchmark(methods=methods, method_overrides=overrides, **{**settings, **options})


def test_summary_overhead_is_relative_to_the_mean_of_both_bare_runs() -> None:
    summary = tiny_benchmark(["swav", "dino"], SMALL_METHODS, steps=2, warmup=1, bank_samples=8)
    bare = summary["bare_images_per_s"]
    assert bare == pytest.approx((summary["bare_images_per_s_first"] + summary["bare_images_per_s_last"]) / 2)
    assert summary["precision"] == "fp32" and summary["views"] == "dino: 2×16 + 2×8"
    assert summary["method_settings"]["swav"] == {"hidden_dim": 16, "feat_dim": 8, "num_prototypes": 10}
    for name in ("swav", "dino"):
        result = summary["methods"][name]
        assert result["overhead"] == pytest.approx(bare / result["images_per_s"] - 1)
        assert result["images_per_s"] == pytest.approx(4 / result["seconds_per_step"])


def test_a_bad_method_key_fails_before_anything_is_timed() -> None:
    with pytest.raises(ModelError, match="num_protos"):
        tiny_benchmark(["swav"], ["swav.num_protos=3"])


def test_cli_json_is_one_object_and_user_errors_are_one_line() -> None:
    common = [
        "bench",
        "train",
        "--backbone",
        "vit_tiny_p4",
        "--global-size",
        "16",
        "--local-size",
        "8",
        "--num-local",
        "1",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
    ]
    for option in ("depth=1", "dim=16", "num_heads=2"):
        common += ["--backbone-option", option]
    for override in SMALL_METHODS:
        common += ["--set", override]
    result = CliRunner().invoke(cli, [*common, "--method", "swav", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary["methods"]) == {"swav"}
    assert summary["backbone_kwargs"] == TINY_VIT

    bad = CliRunner().invoke(cli, [*common, "--method", "swaav"])
    assert bad.exit_code == 2
    assert "unknown method 'swaav'" in bad.output and "Traceback" not in bad.output


def test_a_k_larger_than_the_synthetic_bank_says_which_option_fixes_it() -> None:
    with pytest.raises(PipelineError, match=r"^deepcluster: k=50 is larger .*raise --bank-samples or lower"):
        tiny_benchmark(["deepcluster"], ["deepcluster.num_clusters=50"], bank_samples=8)
