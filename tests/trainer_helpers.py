"""Small, fast training configs over a 16-px digits shard set, shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from clusterssl.pipeline.data.datasets import ensure_builtin_digits


def digits_dir(cache: Path) -> Path:
    """The built-in digits at 16 px, converted once per test run into ``cache``."""
    return ensure_builtin_digits(cache, image_size=16)


def tiny_config(root: Path, out: Path, method: str = "swav", **sections: dict[str, Any]) -> dict[str, Any]:
    """A config that trains a one-block ViT on 16/8-px crops for a few fast steps."""
    methods = {
        "swav": {
            "name": "swav",
            "hidden_dim": 32,
            "feat_dim": 16,
            "num_prototypes": 10,
            "freeze_prototypes_niters": 2,
        },
        "dino": {
            "name": "dino",
            "out_dim": 32,
            "hidden_dim": 32,
            "bottleneck_dim": 16,
            "warmup_teacher_temp_epochs": 2,
        },
        "deepcluster": {"name": "deepcluster", "num_clusters": 20, "pca_dim": 16},
        "deepcluster_v2": {
            "name": "deepcluster_v2",
            "hidden_dim": 32,
            "feat_dim": 16,
            "num_prototypes": [10, 20],
        },
        "pcl": {
            "name": "pcl",
            "hidden_dim": 32,
            "feat_dim": 16,
            "queue_length": 512,
            "momentum": 0.9,
            "num_clusters": [10, 20],
            "warmup_epochs": 1,
            "num_negatives": 8,
            "kmeans_redo": 1,
        },
    }
    config: dict[str, Any] = {
        "data": {
            "train": str(root / "train"),
            "val": str(root / "val"),
            "backend": "torch",
            "num_workers": 0,
        },
        "augment": {
            "preset": "dino" if method == "dino" else "swav",
            "global_size": 16,
            "local_size": 8,
            "num_local": 2,
            "flip_p": 0.0,
            "blur_sigma": [0.1, 0.3],
        },
        "model": {"backbone": "vit_tiny_p4", "backbone_kwargs": {"depth": 1, "dim": 32, "num_heads": 2}},
        "method": methods[method],
        "optim": {"name": "sgd", "lr": 0.1, "warmup_epochs": 0.5},
        "trainer": {
            "epochs": 2,
            "batch_size": 256,
            "output_dir": str(out),
            "log_every": 2,
            "eval_batch_size": 512,
            "seed": 3,
        },
        "tracking": {"enabled": False, "system_metrics": False},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def step_losses(run_dir: Path) -> dict[int, float]:
    """step → loss from a run's metrics.jsonl (a resumed run appends to the same file)."""
    import json

    losses: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "epoch" in record and "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def pipeline_dict(tmp_path: Path, epochs: int = 1) -> dict[str, Any]:
    train = tiny_config(tmp_path, tmp_path / "unused", trainer={"epochs": epochs})
    write_config(tmp_path / "train.yaml", train)
    return {
        "name": "test",
        "workdir": str(tmp_path / "work"),
        "num_workers": 0,
        "convert": {"source": "digits", "image_size": 16, "out": str(tmp_path / "shards"), "workers": 1},
        "pretrain": {"config": str(tmp_path / "train.yaml")},
        "cluster": {"k": [5]},
        "evaluate": {"baseline": False},
        "tracking": {
            "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "experiment": "pipe",
            "system_metrics": False,
        },
    }
