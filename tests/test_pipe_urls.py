"""``pipe:`` shard URLs from a training config and the CLI: the manifest given beside them gives the counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cli_helpers import invoke, one_error_line
from trainer_helpers import tiny_config, write_config

from clusterssl.config import dump_yaml
from clusterssl.models.backbones import create_backbone
from clusterssl.pipeline.train.checkpoint import save_backbone
from clusterssl.pipeline.train.train_config import build_train_config
from clusterssl.pipeline.train.trainer import train


def pipe_urls(shard_dir: Path, last: int) -> str:
    """``pipe:cat`` over shards 0..last of ``shard_dir`` (one brace pattern, streamed through a process)."""
    return f"pipe:cat {shard_dir}/shard-{{000000..{last:06d}}}.tar"


def test_training_and_extraction_read_pipe_urls_with_the_manifest_given(
    digits16: Path, tmp_path: Path
) -> None:
    train_dir = digits16 / "train"
    data = {
        "train": pipe_urls(train_dir, 1),
        "manifest": str(train_dir / "manifest.json"),
        "val": None,
    }
    config = build_train_config(tiny_config(digits16, tmp_path / "run", trainer={"epochs": 1}, data=data))
    summary = train(config, progress=False)
    # two shards of 256 samples, batches of 256: exactly two steps (the counts came from the manifest)
    assert summary.steps == 2 and not summary.interrupted

    # the whole set streamed through pipe: gives the bank the shard directory gives, row for row
    checkpoint = str(tmp_path / "run")
    common = ("--num-workers", "0", "--batch-size", "400", "--backend", "torch", "--json")
    from_pipe = invoke("extract", checkpoint, pipe_urls(train_dir, 6), "--out", str(tmp_path / "pipe"),
                       "--manifest", str(train_dir / "manifest.json"), *common)  # fmt: skip
    assert from_pipe.exit_code == 0, from_pipe.output
    from_dir = invoke("extract", checkpoint, str(train_dir), "--out", str(tmp_path / "dir"), *common)
    assert from_dir.exit_code == 0, from_dir.output
    features = np.load(tmp_path / "pipe" / "features.npy")
    assert features.shape == (1618, 32)
    np.testing.assert_array_equal(features, np.load(tmp_path / "dir" / "features.npy"))


def test_pipe_urls_without_a_manifest_say_how_to_give_it(digits16: Path, tmp_path: Path) -> None:
    data = {"train": pipe_urls(digits16 / "train", 1), "val": None}
    settings = tiny_config(digits16, tmp_path / "run", data=data)
    config = write_config(tmp_path / "cfg.yaml", settings)
    line = one_error_line(invoke("train", str(config)))
    assert "cannot tell how many samples" in line and "data.manifest" in line

    built = build_train_config(settings)

    backbone = save_backbone(
        create_backbone(built.model.backbone, **built.model.backbone_kwargs),
        dump_yaml(built),
        tmp_path / "backbone.pt",
    )
    line = one_error_line(
        invoke("extract", str(backbone), pipe_urls(digits16 / "train", 1), "--out", str(tmp_path / "bank"))
    )
    assert "cannot tell how many samples" in line and "--manifest" in line
