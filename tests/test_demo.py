"""`clusterssl demo` (the README's main command) on a short schedule: the whole pipeline per method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterssl.tools.cli import cli
from clusterssl.tools.demo_cmd import render_demo_summary


def test_demo_runs_the_pipeline_and_prints_a_table(tmp_path: Path) -> None:
    args = ["demo", "--methods", "swav", "--epochs", "1", "--data-dir", str(tmp_path / "data"),
            "--workdir", str(tmp_path / "runs"), "--no-track"]  # fmt: skip
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    [row] = summary["methods"]
    assert row["method"] == "swav" and 0.0 < row["knn_top1"] <= 1.0 and 0.0 <= row["nmi"] <= 1.0
    assert 0.0 < row["random_init_knn_top1"] <= 1.0 and 0.0 <= row["random_init_nmi"] <= 1.0
    manifests = {
        name: json.loads((tmp_path / "data" / "digits" / name / "manifest.json").read_text())
        for name in ("train", "val")
    }
    assert {name: m["count"] for name, m in manifests.items()} == {"train": 1618, "val": 179}
    stages = json.loads((tmp_path / "runs" / "swav" / "stages" / "evaluate.json").read_text())
    assert stages["status"] == "complete" and stages["outputs"]["knn_top1"] == row["knn_top1"]

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    lines = again.output.splitlines()
    [header] = [line for line in lines if line.startswith("method")]
    assert header.split() == ["method", "k-NN", "top-1", "NMI", "Δ", "k-NN", "Δ", "NMI", "time"]
    [swav] = [line.split() for line in lines if line.startswith("swav ")]
    assert swav[1:3] == [f"{row['knn_top1']:.4f}", f"{row['nmi']:.4f}"]
    assert swav[3:5] == [
        f"{row['knn_top1'] - row['random_init_knn_top1']:+.3f}",
        f"{row['nmi'] - row['random_init_nmi']:+.3f}",
    ]
    [floor] = [line.split() for line in lines if line.startswith("random init")]
    assert floor[2:4] == [f"{row['random_init_knn_top1']:.4f}", f"{row['random_init_nmi']:.4f}"]


def test_methods_on_other_backbones_get_their_own_floor_rows() -> None:
    def row(method: str, floor: float) -> dict[str, object]:
        return {"method": method, "knn_top1": 0.99, "nmi": 0.8, "random_init_knn_top1": floor,
                "random_init_nmi": 0.6, "seconds": 10.0}  # fmt: skip

    shared = render_demo_summary({"methods": [row("swav", 0.9), row("dino", 0.9)], "tracking_uri": None})
    assert [line.split()[:4] for line in shared.splitlines() if line.startswith("random")] == [
        ["random", "init", "0.9000", "0.6000"]
    ]
    split = render_demo_summary({"methods": [row("swav", 0.9), row("pcl", 0.8)], "tracking_uri": None})
    floors = [line.split()[:5] for line in split.splitlines() if line.startswith("random")]
    assert floors == [
        ["random", "init:", "swav", "0.9000", "0.6000"],
        ["random", "init:", "pcl", "0.8000", "0.6000"],
    ]
    assert "+0.190" in split  # pcl's margin is over its own floor


def test_unknown_demo_method_is_one_line() -> None:
    result = CliRunner().invoke(cli, ["demo", "--methods", "swav,byol", "--no-track"])
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == "Error: unknown demo method(s) byol; known: swav, dino, deepcluster, pcl, ibot"
    )


def test_summary_shows_one_random_init_row_per_backbone() -> None:
    from clusterssl.tools.demo_cmd import render_demo_summary

    def row(method: str, floor: tuple[float, float]) -> dict[str, object]:
        knn, nmi = floor
        return {"method": method, "knn_top1": 0.9, "nmi": 0.5, "seconds": 1.0,
                "random_init_knn_top1": knn, "random_init_nmi": nmi}  # fmt: skip

    resnet, vit = (0.939, 0.658), (0.4916, 0.259)
    text = render_demo_summary({"methods": [row("swav", resnet), row("dino", resnet), row("ibot", vit)],
                                "tracking_uri": None})  # fmt: skip
    floors = [line for line in text.splitlines() if line.startswith("random init")]
    assert len(floors) == 2
    assert floors[0].split()[:5] == ["random", "init:", "swav,dino", "0.9390", "0.6580"]
    assert floors[1].split()[:5] == ["random", "init:", "ibot", "0.4916", "0.2590"]
    one = render_demo_summary({"methods": [row("swav", resnet)], "tracking_uri": None})
    assert "(same backbone, untrained)" in one


def test_fashion_mnist_not_installed_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLUSTERSSL_FASHION_MNIST", str(tmp_path / "missing"))
    result = CliRunner().invoke(cli, ["demo", "--data", "fashion-mnist", "--no-track"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        f"Error: Fashion-MNIST is not in {tmp_path / 'missing'}: install it with 'apt-get "
    )


def test_fashion_mnist_demo_runs_the_methods_with_a_fashion_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a small stand-in of the IDX files: the pipeline converts train and t10k, trains the method's
    Fashion-MNIST config and evaluates on the test set; a method without such a config is one line."""
    import numpy as np
    from idx_helpers import write_pair

    from clusterssl.tools.demo_cmd import fashion_methods

    rng = np.random.default_rng(0)
    for split, count in (("train", 300), ("t10k", 100)):
        images = rng.integers(0, 256, (count, 28, 28))
        write_pair(tmp_path / "fashion", split, images, np.arange(count) % 10, gz=True)
    monkeypatch.setenv("CLUSTERSSL_FASHION_MNIST", str(tmp_path / "fashion"))
    assert "swav" in fashion_methods()
    args = ["demo", "--data", "fashion-mnist", "--methods", "swav", "--epochs", "1",
            "--data-dir", str(tmp_path / "data"), "--workdir", str(tmp_path / "runs"), "--no-track", "--json"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout.strip().splitlines()[-1])["methods"]
    assert row["method"] == "swav" and 0.0 <= row["knn_top1"] <= 1.0
    stages = json.loads((tmp_path / "runs" / "swav-fashion" / "stages" / "convert.json").read_text())
    assert (stages["outputs"]["train"]["count"], stages["outputs"]["val"]["count"]) == (300, 100)
    missing = [m for m in ("dino", "pcl", "ibot", "deepcluster") if m not in fashion_methods()]
    if missing:
        refused = CliRunner().invoke(cli, ["demo", "--data", "fashion-mnist", "--methods", missing[0]])
        assert refused.exit_code == 2
        assert refused.stderr.strip().startswith(f"Error: no Fashion-MNIST config for method(s) {missing[0]}")


@pytest.mark.parametrize("method", ["swav", "dino", "deepcluster", "pcl", "ibot"])
def test_each_demo_method_builds_its_digits_config_with_the_demo_settings(
    tmp_path: Path, method: str
) -> None:
    from clusterssl.pipeline.train.train_config import load_train_config
    from clusterssl.tools.demo_cmd import DEMO_EPOCHS, demo_pipeline

    pipeline = demo_pipeline(method, tmp_path / "data", tmp_path / "runs", None, track=False)
    config = load_train_config(pipeline.pretrain.config, pipeline.pretrain.overrides)
    assert config.method_name == method and config.trainer.epochs == DEMO_EPOCHS[method]
    resnet = config.model.backbone == "resnet_tiny"
    assert config.augment.global_size == (16 if resnet else 32)  # the 8x8 digits at 16 px; iBOT's ViT at 32
    if method == "dino":
        assert config.optim.lr == 0.3 and tuple(config.augment.global_scale) == (0.25, 1.0)
    if method == "pcl":
        assert config.trainer.batch_size == 64
