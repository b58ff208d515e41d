"""PNG plots logged as MLflow artifacts: loss curve, DINO attention maps, cluster sizes, image grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(
    losses: Sequence[tuple[int, float]], path: str | Path, title: str = "training loss"
) -> Path | None:
    """Per-step loss with a moving average; None when there is nothing to plot."""
    if not losses:
        return None
    plt = _pyplot()
    steps = np.array([s for s, _ in losses])
    values = np.array([v for _, v in losses])
    window = max(1, len(values) // 50)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(steps, values, alpha=0.3, label="per step")
    axis.plot(steps[window - 1 :], smooth, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def save_image_grid(images: torch.Tensor, path: str | Path, *, rows: int, titles: Sequence[str] = ()) -> Path:
    """images (n, 3, H, W) in [0, 1] → a grid PNG with ``rows`` rows."""
    plt = _pyplot()
    n = images.shape[0]
    cols = max(1, -(-n // rows))
    figure, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for i, axis in enumerate(axes.flat):
        axis.axis("off")
        if i < n:
            axis.imshow(images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            if i < len(titles):
                axis.set_title(titles[i], fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@torch.no_grad()
def attention_maps(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's CLS-token attention to the patches, per head, on the patch grid.

    images (batch, 3, H, W) → (batch, heads, H / patch, W / patch).
    """
    attention = vit.last_selfattention(images)  # (batch, heads, tokens, tokens)
    patch = int(vit.patch_size)
    grid_h, grid_w = images.shape[-2] // patch, images.shape[-1] // patch
    cls_to_patches = attention[:, :, 0, 1 : 1 + grid_h * grid_w]
    return cls_to_patches.reshape(images.shape[0], -1, grid_h, grid_w)


def plot_model_attention(vit: nn.Module, images: torch.Tensor, path: str | Path) -> Path:
    """DINO's picture: the last block's CLS attention per head for ``images`` (batch, 3, H, W), computed
    in eval mode (the module's mode is restored), written as ``plot_attention_maps`` does."""
    was_training = vit.training
    vit.eval()
    try:
        maps = attention_maps(vit, images)
    finally:
        vit.train(was_training)
    return plot_attention_maps(images, maps, path)


def plot_attention_maps(images: torch.Tensor, maps: torch.Tensor, path: str | Path) -> Path:
    """One row per image: the image (unnormalised to [0, 1]) then each head's map."""
    plt = _pyplot()
    batch, heads = maps.shape[:2]
    figure, axes = plt.subplots(batch, heads + 1, figsize=(1.5 * (heads + 1), 1.5 * batch), squeeze=False)
    for row in range(batch):
        image = images[row]
        image = (image - image.min()) / (image.max() - image.min() + 1e-8)
        axes[row, 0].imshow(image.permute(1, 2, 0).cpu().numpy())
        for head in range(heads):
            axes[row, head + 1].imshow(maps[row, head].float().cpu().numpy(), cmap="inferno")
        for axis in axes[row]:
            axis.axis("off")
    axes[0, 0].set_title("image", fontsize=7)
    for head in range(heads):
        axes[0, head + 1].set_title(f"head {head}", fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_cluster_sizes(
    assignments: np.ndarray, k: int, path: str | Path, title: str = "cluster sizes"
) -> Path:
    """Histogram of cluster sizes (how many clusters hold how many samples), empty clusters included."""
    plt = _pyplot()
    sizes = np.bincount(np.asarray(assignments), minlength=k)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.hist(sizes, bins=min(50, max(5, k // 4)))
    axis.set_xlabel("samples in the cluster")
    axis.set_ylabel("clusters")
    axis.set_title(f"{title} (k={k}, empty={int((sizes == 0).sum())})")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
