"""Evaluation of frozen features: weighted k-NN (DINO's protocol) and k-means NMI/ARI against labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError


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
) -> KnnResult:
    """Top-1/top-5 accuracy of the weighted k-NN classifier; samples labelled -1 are left out."""
    train_f, train_y = _labelled(train_features, train_labels)
    query_f, query_y = _labelled(query_features, query_labels)
    if query_f.shape[0] == 0:
        raise PipelineError("k-NN evaluation needs labelled query samples")
    num_classes = int(max(train_y.max(), query_y.max())) + 1
    scores = knn_predict(train_f, train_y, query_f, num_classes=num_classes, k=k, temperature=temperature)
    ranked = scores.argsort(dim=1, descending=True)
    top1 = (ranked[:, 0] == query_y).float().mean().item()
    top5 = (ranked[:, : min(5, num_classes)] == query_y[:, None]).any(dim=1).float().mean().item()
    return KnnResult(top1=top1, top5=top5, num_train=int(train_f.shape[0]), num_query=int(query_f.shape[0]))


def _labelled(
    features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    features_t = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    labels_t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    keep = labels_t >= 0
    return features_t[keep], labels_t[keep]
