"""`clusterssl bench gpu` on a machine without a GPU, and the parts of it that run on the CPU: the FLOP
count behind the TFLOP/s column, the peak table, the printout of measured and skipped parts."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from clusterssl.tools.bench_gpu import (
    PARTS,
    Part,
    faiss_gpu_hint,
    peak_tflops,
    render,
    training_flops,
    view_sizes,
)
from clusterssl.tools.cli import cli


def test_without_a_gpu_it_says_so_and_exits_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = CliRunner().invoke(cli, ["bench", "gpu"])
    assert text.exit_code == 0, text.output
    assert text.output.splitlines()[0] == "no GPU: nothing measured"
    as_json = CliRunner().invoke(cli, ["bench", "gpu", "--json"])
    summary = json.loads(as_json.output)
    assert summary["device"] is None
    assert [p["name"] for p in summary["parts"]] == list(PARTS)
    assert all("no CUDA GPU" in p["skipped"] for p in summary["parts"])


def test_unknown_methods_are_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["bench", "gpu", "--methods", "swav,simclr"])
    assert result.exit_code == 2 and "simclr" in result.output


def test_training_flops_count_forward_and_backward() -> None:
    """Forward: 2 FLOPs per multiply-add. Backward: the weight gradient of every layer, and the input
    gradient of every layer but the first (the images need none)."""
    first, second = nn.Linear(48, 10, bias=False), nn.Linear(10, 5, bias=False)
    one_layer = nn.Sequential(nn.Flatten(), first)
    assert training_flops(one_layer, [4]) == 2 * (2 * 48 * 10)
    assert training_flops(one_layer, [4, 4]) == 2 * 2 * (2 * 48 * 10)
    two_layers = nn.Sequential(nn.Flatten(), first, second)
    assert training_flops(two_layers, [4]) == 2 * (2 * 48 * 10) + 3 * (2 * 10 * 5)
    assert first.weight.device.type == "cpu", "counting leaves the model where it was"


def test_resnet50_flops_match_its_known_size() -> None:
    """ResNet-50 at 224 px is ~4.1 GMACs forward, ~8.2 GFLOPs; training is about 3× that."""
    from clusterssl.models.backbones import create_backbone

    flops = training_flops(create_backbone("resnet50"), [224])
    assert 3 * 7.8e9 < flops < 3 * 8.6e9
    assert view_sizes("swav")[:2] == [224, 224] and len(view_sizes("swav")) > 2


def test_peaks_by_device_name() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None


def test_the_table_shows_figures_and_skip_reasons() -> None:
    parts = [
        Part("train/swav", {"images_per_s": 812.5, "tflops": 190.1, "peak_tflops": 989.0}),
        Part("faiss", skipped=faiss_gpu_hint()),
    ]
    summary = {"device": "NVIDIA H100", "peak_bf16_tflops": 989.0, "parts": [p.__dict__ for p in parts]}
    lines = render(summary).splitlines()
    assert lines[0] == "NVIDIA H100 (bf16 peak 989.0 TFLOP/s)"
    assert "images_per_s=812.5" in lines[1] and "tflops=190.1" in lines[1]
    assert "skipped: faiss sees no GPU although CUDA works" in lines[2]


def test_every_method_times_its_imagenet_recipe_with_k_within_the_bank() -> None:
    from clusterssl.tools.bench_gpu import BANK_SAMPLES, METHODS, imagenet_recipe

    recipes = {method: imagenet_recipe(method) for method in METHODS}
    assert {m: r.backbone for m, r in recipes.items()} == {
        "swav": "resnet50", "deepcluster": "resnet50", "deepcluster_v2": "resnet50", "pcl": "resnet50",
        "dino": "vit_small", "ibot": "vit_small",
    }  # fmt: skip
    assert view_sizes("dino") == [224, 224] + [96] * 8 and view_sizes("ibot") == [224, 224] + [96] * 10
    assert max(recipes["pcl"].settings["num_clusters"]) <= BANK_SAMPLES
    assert max(recipes["deepcluster_v2"].settings["num_prototypes"]) <= BANK_SAMPLES
    assert recipes["deepcluster"].settings["num_clusters"] <= BANK_SAMPLES


@pytest.mark.parametrize(
    ("method", "backbone", "settings"),
    [
        ("deepcluster", "resnet_tiny", {"num_clusters": 6}),
        ("pcl", "resnet_tiny", {"num_clusters": [4, 6]}),
        ("ibot", "vit_tiny_p4", {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16}),
    ],
)
def test_a_step_is_timed_for_methods_that_cluster_first_and_for_ibot(
    method: str, backbone: str, settings: dict
) -> None:
    """The clustering methods embed and cluster the synthetic bank before their first step; the timed
    step runs on the CPU too (figures not checked: benchmarks are not tests)."""
    from clusterssl.pipeline.data.spec import MultiCropSpec
    from clusterssl.tools.bench_gpu import Recipe, measure_training

    spec = MultiCropSpec.preset("swav", global_size=16, local_size=8, num_local=1)
    vit = {"dim": 32, "depth": 1, "num_heads": 2} if backbone.startswith("vit") else {}
    part = measure_training(
        method, torch.device("cpu"), 1, 4, None, recipe=Recipe(backbone, spec, settings, vit), bank_samples=16
    )
    assert part.name == f"train/{method}" and part.skipped is None
    assert part.figures["backbone"] == backbone and part.figures["images_per_s"] > 0
    assert part.figures["peak_memory_gib"] is None  # no CUDA memory on a CPU
