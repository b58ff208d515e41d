"""Evaluation of frozen features: weighted k-NN (DINO's protocol), a linear probe and k-means NMI/ARI
against labels; an evaluation run also logs a 2-D map of the evaluation features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from clusterssl.errors import PipelineError
from clusterssl.models.types import FeatureBank

if TYPE_CHECKING:
    from clusterssl.pipeline.features.extraction import ExtractionSettings
    from clusterssl.pipeline.features.linear_probe import LinearProbeResult
    from clusterssl.pipeline.tracking.runs import Tracker


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN class scores (DINO): cosine similarity to the train features, the k nearest vote
    for their class with weight exp(sim / T).

    train_features (N, D), train_labels (N,) int64 in [0, num_classes), query_features (Q, D)
    → (Q, num_classes) summed vote weights. Features are L2-normalised here.
    """
    if train_features.shape[0] == 0:
        raise PipelineError("k-NN needs at least one labelled training sample")
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, query_features.shape[0], chunk_size):
        query = F.normalize(query_features[start : start + chunk_size].float(), dim=1)
        similarity = query @ train.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


@dataclass(frozen=True)
class KnnResult:
    top1: float
    top5: float
    num_train: int
    num_query: int


def knn_accuracy(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    query_features: np.ndarray | torch.Tensor,
    query_labels: np.ndarray | torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> KnnResult:
    """Top-1/top-5 accuracy of the weighted k-NN classifier; samples labelled -1 are left out.

    ``num_classes``: the class count of the data (its manifest's), which sizes the vote table; a label
    outside it is refused. None: the largest label + 1 (for arrays built in memory).
    """
    train_f, train_y = _labelled(train_features, train_labels)
    query_f, query_y = _labelled(query_features, query_labels)
    if query_f.shape[0] == 0:
        raise PipelineError("k-NN evaluation needs labelled query samples")
    if num_classes is None:
        num_classes = int(max(train_y.max(), query_y.max())) + 1
    for name, labels in (("reference", train_y), ("query", query_y)):
        _check_labels(labels, num_classes, name)
    scores = knn_predict(train_f, train_y, query_f, num_classes=num_classes, k=k, temperature=temperature)
    ranked = scores.argsort(dim=1, descending=True)
    top1 = (ranked[:, 0] == query_y).float().mean().item()
    top5 = (ranked[:, : min(5, num_classes)] == query_y[:, None]).any(dim=1).float().mean().item()
    return KnnResult(top1=top1, top5=top5, num_train=int(train_f.shape[0]), num_query=int(query_f.shape[0]))


def _check_labels(labels: torch.Tensor, num_classes: int, name: str) -> None:
    """Refuse labels outside ``0..num_classes-1``: the vote table has one column per class, and one
    tampered label of 10^12 would otherwise ask for terabytes."""
    outside = labels >= num_classes
    if bool(outside.any()):
        raise PipelineError(
            f"a {name} sample has label {int(labels[outside][0])}, outside the {num_classes} classes its "
            "manifest lists; the shards do not match their manifest (run `clusterssl shards verify`)"
        )


def _labelled(
    features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    features_t = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    labels_t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    keep = labels_t >= 0
    return features_t[keep], labels_t[keep]


@dataclass(frozen=True)
class EvalResult:
    """k-NN accuracy of the val features against the train features, and k-means (k = number of
    classes) NMI/ARI of the val features against their labels."""

    knn_top1: float
    knn_top5: float
    nmi: float
    ari: float
    num_train: int
    num_val: int
    linear: LinearProbeResult | None = None
    """The linear probe's result, when it was fit."""

    def metrics(self) -> dict[str, float]:
        linear = {} if self.linear is None else {"linear_top1": self.linear.top1}
        return {
            "knn_top1": self.knn_top1,
            "knn_top5": self.knn_top5,
            **linear,
            "nmi": self.nmi,
            "ari": self.ari,
        }


def kmeans_agreement(
    features: np.ndarray, labels: np.ndarray, *, seed: int = 0, nredo: int = 5
) -> tuple[float, float]:
    """NMI and ARI between the labels and k-means clusters of the L2-normalised features, k = #classes.

    Samples labelled -1 are left out. Several restarts (``nredo``) keep the figure stable on small sets.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from clusterssl.models.clustering import kmeans

    keep = np.asarray(labels) >= 0
    feats = np.asarray(features, dtype=np.float32)[keep]
    truth = np.asarray(labels)[keep]
    num_classes = len(np.unique(truth))
    if num_classes < 2:
        raise PipelineError("NMI/ARI need labelled samples of at least two classes")
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    result = kmeans(feats, num_classes, seed=seed, nredo=nredo)
    return float(normalized_mutual_info_score(truth, result.assignments)), float(
        adjusted_rand_score(truth, result.assignments)
    )


def evaluate_features(
    train: FeatureBank,
    val: FeatureBank,
    *,
    k: int = 20,
    temperature: float = 0.07,
    seed: int = 0,
    num_classes: int | None = None,
    linear: bool = True,
    device: torch.device | str | None = None,
) -> EvalResult:
    """``num_classes``: the class count the manifests give (see ``knn_accuracy``); ``linear``: also fit
    the linear probe (``linear_probe``), on ``device`` (default: the CPU)."""
    from clusterssl.pipeline.features.linear_probe import linear_probe

    if train.labels is None or val.labels is None:
        raise PipelineError("evaluation needs labelled train and val sets (their manifests list no labels)")
    knn = knn_accuracy(
        train.features,
        train.labels,
        val.features,
        val.labels,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
    )
    nmi, ari = kmeans_agreement(np.asarray(val.features), val.labels, seed=seed)
    probe = None
    if linear:
        probe = linear_probe(
            train.features,
            train.labels,
            val.features,
            val.labels,
            num_classes=num_classes,
            seed=seed,
            device=device,
        )
    return EvalResult(
        knn_top1=knn.top1,
        knn_top5=knn.top5,
        nmi=nmi,
        ari=ari,
        num_train=knn.num_train,
        num_val=knn.num_query,
        linear=probe,
    )


def extract_eval_features(module: torch.nn.Module, data: object, **extraction: object) -> FeatureBank:
    """Embed a whole labelled set in memory with the extraction pass (eval view, each sample once)."""
    from clusterssl.pipeline.features.extraction import extract_features

    bank = extract_features(module, data, out_dir=None, progress=False, **extraction)  # type: ignore[arg-type]
    return bank.as_feature_bank()


def evaluate_checkpoint(
    checkpoint: str,
    train_data: str,
    val_data: str,
    *,
    settings: ExtractionSettings | None = None,
    k: int = 20,
    temperature: float = 0.07,
    baseline: bool = False,
    device: str = "auto",
    track: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    parent_run_id: str | None = None,
    train_manifest: str | None = None,
    val_manifest: str | None = None,
    map_path: str | None = None,
) -> dict[str, object]:
    """Evaluate a run's feature extractor (and optionally its random-init twin); logs an MLflow run with
    the metrics and the embedding map (``embedding_map.png``).

    train_manifest / val_manifest: the sets' manifest.json when they are given as URLs (``pipe:``, http).
    map_path: also keep the map's PNG there (it is drawn either way when tracking).
    """
    from dataclasses import replace

    from clusterssl.pipeline.data.datasets import resolve_data
    from clusterssl.pipeline.tracking.runs import open_tracker, tracking_run
    from clusterssl.pipeline.train.checkpoint import load_feature_extractor
    from clusterssl.pipeline.train.world import DistributedEnv, resolve_device

    module, config = load_feature_extractor(checkpoint)
    torch_device = resolve_device(device, DistributedEnv())
    data_kwargs = {"cache_dir": config.data.cache_dir, "image_size": config.data.digits_image_size}
    train = resolve_data(train_data, split="train", manifest=train_manifest, **data_kwargs)
    val = resolve_data(val_data, split="val", manifest=val_manifest, **data_kwargs)
    extraction = dict(
        spec=config.augment.eval_spec(),
        settings=settings,
        device=torch_device,
    )

    def run(extractor: torch.nn.Module) -> tuple[EvalResult, FeatureBank]:
        extractor = extractor.to(torch_device)
        val_bank = extract_eval_features(extractor, val.source, **extraction)
        result = evaluate_features(
            extract_eval_features(extractor, train.source, **extraction),
            val_bank,
            k=k,
            temperature=temperature,
            seed=config.trainer.seed,
            # from the manifests, not from the largest label: one tampered label cannot size the votes
            num_classes=max(len(train.source.classes), len(val.source.classes)),
            device=torch_device,
        )
        return result, val_bank

    tracking = replace(
        config.tracking,
        enabled=track,
        uri=tracking_uri or config.tracking.uri,
        experiment=experiment or config.tracking.experiment,
        run_name=f"eval-{config.method_name}-{config.model.backbone}",
    )
    tracker = open_tracker(
        tracking,
        run_name=tracking.run_name or "eval",
        parent_run_id=parent_run_id,
        tags={"stage": "evaluate", "method": config.method_name, "backbone": config.model.backbone},
    )
    with tracking_run(tracker):
        tracker.log_params(
            {
                "checkpoint": checkpoint,
                "train": train.name,
                "val": val.name,
                "k": k,
                "temperature": temperature,
            }
        )
        tracker.log_shard_set(train.source.manifest, train.name, "training")
        tracker.log_shard_set(val.source.manifest, val.name, "evaluation")
        result, val_bank = run(module)
        summary: dict[str, object] = {
            "checkpoint": checkpoint,
            **result.metrics(),
            "num_train": result.num_train,
            "num_val": result.num_val,
            "run_id": tracker.run_id,
        }
        if result.linear is not None:
            summary["linear_probe"] = result.linear.to_json()
        tracker.log_metrics(result.metrics(), step=0)
        if tracker.run_id is not None or map_path is not None:
            summary["embedding_map"] = _log_embedding_map(
                tracker, val_bank, val.source.classes, map_path, seed=config.trainer.seed
            )
        if baseline:
            random_module, _ = load_feature_extractor(checkpoint, random_init=True)
            floor, _ = run(random_module)
            summary["baseline"] = floor.metrics()
            tracker.log_metrics(
                {f"random_init_{key}": value for key, value in floor.metrics().items()}, step=0
            )
    return summary


MAP_ARTIFACT = "embedding_map.png"


def _log_embedding_map(
    tracker: Tracker, bank: FeatureBank, class_names: list[str], map_path: str | None, seed: int
) -> dict[str, object]:
    """Draw the map of ``bank``, log it as the run's ``embedding_map.png`` and keep a copy at ``map_path``."""
    import shutil
    import tempfile
    from pathlib import Path

    from clusterssl.pipeline.features.embedding_map import embedding_map

    labels = bank.labels if bank.labels is not None else np.full(bank.num_samples, -1)
    with tempfile.TemporaryDirectory() as scratch:
        drawn = embedding_map(
            bank.features, labels, Path(scratch) / MAP_ARTIFACT, class_names=class_names, seed=seed
        )
        if tracker.run_id is not None:
            tracker.log_artifact(drawn.path)
        if map_path is not None:
            Path(map_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(drawn.path, map_path)
    return {
        "points": len(drawn.rows),
        "path": map_path,
        "artifact": MAP_ARTIFACT if tracker.run_id is not None else None,
    }
