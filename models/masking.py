"""Block-wise patch masks for masked image modelling (BEiT, Bao et al. 2022; iBOT, Zhou et al. 2022).

A mask covers a patch grid with a few random rectangles ("blocks") of log-uniform aspect ratio until about
``ratio · patches`` patches are covered; ``ratio`` is drawn per image around 0.3 ± 0.2, and only a share of
the images is masked at all (iBOT's ViT recipe masks half of them: prediction ratio 0 or U(0.1, 0.5)).

Every mask is a pure function of ``(seed, epoch, sample index, view)``: each image gets its own generator
keyed by those four numbers, so a sample's masks do not depend on the worker, the rank or the batch it
lands in, and a resumed epoch draws them again exactly. The generator is Python's ``random.Random`` seeded
with the key as text (hashed with SHA-512, the same in every process): seeding and scalar draws cost a
few microseconds, where a numpy generator per image costs tens to hundreds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BLOCK_ATTEMPTS = 10
"""Rectangles tried before giving up on adding one more block (BEiT's value)."""


@dataclass(frozen=True)
class BlockMaskSpec:
    """How many patches to mask and in what shapes.

    ratio, ratio_var: the masked share of a masked image is drawn uniformly in [ratio − var, ratio + var].
    share:            probability that an image is masked at all (the others keep every patch).
    min_aspect:       blocks have height/width in [min_aspect, 1/min_aspect], log-uniformly.
    """

    ratio: float = 0.3
    ratio_var: float = 0.2
    share: float = 0.5
    min_aspect: float = 0.3

    def __post_init__(self) -> None:
        if not (0.0 <= self.ratio_var <= self.ratio and self.ratio + self.ratio_var <= 1.0):
            raise ValueError(f"mask ratio {self.ratio} ± {self.ratio_var} must stay within [0, 1]")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"mask share must lie in [0, 1], got {self.share}")
        if not 0.0 < self.min_aspect <= 1.0:
            raise ValueError(f"mask min_aspect must lie in (0, 1], got {self.min_aspect}")


def block_mask(rng: random.Random, grid_h: int, grid_w: int, target: float, min_aspect: float) -> np.ndarray:
    """(grid_h, grid_w) bool: blocks added one by one while fewer than ``target`` patches are masked.

    Each try draws an area between ``(min(grid) // 3)²`` and the patches still wanted and a log-uniform
    aspect ratio; the rectangle (strictly smaller than the grid) is kept when it adds at least one new
    patch and no more than are still wanted, so the count never exceeds ``target``. After
    ``BLOCK_ATTEMPTS`` failed tries the mask stays as it is.
    """
    mask = np.zeros((grid_h, grid_w), dtype=bool)
    smallest = (min(grid_h, grid_w) // 3) ** 2
    log_aspect = math.log(min_aspect)
    masked = 0
    while masked < target:
        wanted = target - masked
        added = 0
        for _ in range(BLOCK_ATTEMPTS):
            # uniform() takes its bounds in either order: once fewer patches are wanted than the
            # smallest area, the blocks shrink towards what is left.
            area = rng.uniform(smallest, wanted)
            aspect = math.exp(rng.uniform(log_aspect, -log_aspect))
            height = round(math.sqrt(area * aspect))
            width = round(math.sqrt(area / aspect))
            if height < grid_h and width < grid_w:
                top = rng.randint(0, grid_h - height)
                left = rng.randint(0, grid_w - width)
                block = mask[top : top + height, left : left + width]
                new = height * width - int(block.sum())
                if 0 < new <= wanted:
                    block[...] = True
                    added = new
            if added:
                break
        if not added:
            break
        masked += added
    return mask


def sample_rng(seed: int, epoch: int, index: int, view: int) -> random.Random:
    """The generator of one (sample, view), seeded with the key as text (padding's index -1 included)."""
    return random.Random(f"block-mask:{seed}:{epoch}:{index}:{view}")


def draw_block_masks(
    spec: BlockMaskSpec,
    seed: int,
    epoch: int,
    index: Sequence[int] | np.ndarray,
    num_views: int,
    grid: tuple[int, int],
) -> np.ndarray:
    """(num_views, batch, grid_h · grid_w) bool masks, row-major over the grid, for views 0..num_views−1
    of the samples with global indices ``index`` (batch,)."""
    grid_h, grid_w = grid
    masks = np.zeros((num_views, len(index), grid_h * grid_w), dtype=bool)
    for view in range(num_views):
        for row, sample in enumerate(np.asarray(index, dtype=np.int64).tolist()):
            rng = sample_rng(seed, epoch, sample, view)
            if rng.random() >= spec.share:
                continue
            ratio = rng.uniform(spec.ratio - spec.ratio_var, spec.ratio + spec.ratio_var)
            masks[view, row] = block_mask(
                rng, grid_h, grid_w, ratio * grid_h * grid_w, spec.min_aspect
            ).ravel()
    return masks
