"""What the views of a sample look like: ``ViewSpec`` per view, ``MultiCropSpec`` for the set, presets.

A view is always "a box of the decoded image, resized to ``size``×``size``", then optional flip, colour
jitter, grayscale, Gaussian blur and solarisation, then normalisation:

    box:        random (RandomResizedCrop: area fraction in ``scale``, aspect ratio log-uniform in
                ``ratio``, 10 tries, then a centre crop) or centre (eval: the central square of
                ``center_fraction`` × the shorter side, i.e. resize to size/center_fraction + centre crop)
    flip:       horizontal, with probability ``flip_p``
    jitter:     with probability ``jitter_p``: brightness, contrast (around the crop's mean luma),
                saturation and hue (a rotation in YIQ space, as DALI's colour ops do), in that order;
                factors uniform in [max(0, 1 - s), 1 + s], hue shift uniform in [-hue, hue] turns
    grayscale:  with probability ``grayscale_p`` (luma Y = 0.299 R + 0.587 G + 0.114 B)
    blur:       with probability ``blur_p``, sigma uniform in ``blur_sigma`` pixels, kernel ±ceil(3σ)
    solarise:   with probability ``solarize_p``, values >= 128 (of 255) inverted
    normalise:  (x / 255 - mean) / std per channel

Both backends (DALI and torch) implement exactly this list, so they produce the same distribution of
views; the random parameters themselves are drawn once, in ``clusterssl.pipeline.data.augment``, for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from clusterssl.errors import PipelineError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_RATIO = (3 / 4, 4 / 3)
EVAL_CENTER_FRACTION = 0.875
"""224 / 256: the classic "resize to 256, centre crop 224" evaluation transform."""


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise PipelineError(f"{name} must be a range (lo, hi) with {low} <= lo <= hi <= {high}, got {value}")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise PipelineError(f"{name} must be a probability in [0, 1], got {value}")


@dataclass(frozen=True)
class ViewSpec:
    """One view: how its box is chosen and which augmentations it gets (see the module docstring)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = DEFAULT_RATIO
    crop: Literal["random", "center"] = "random"
    center_fraction: float = EVAL_CENTER_FRACTION
    flip_p: float = 0.0
    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise PipelineError(f"view size must be at least 1 pixel, got {self.size}")
        if self.crop not in ("random", "center"):
            raise PipelineError(f"view crop must be 'random' or 'center', got {self.crop!r}")
        _check_range("scale", self.scale, 1e-6, 1.0)
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise PipelineError(f"ratio must be a range 0 < lo <= hi, got {self.ratio}")
        if not 0.0 < self.center_fraction <= 1.0:
            raise PipelineError(f"center_fraction must be in (0, 1], got {self.center_fraction}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            _check_probability(name, getattr(self, name))
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise PipelineError(f"{name} strength must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise PipelineError(f"hue strength must be in [0, 0.5] turns, got {self.hue}")
        _check_range("blur_sigma", self.blur_sigma, 1e-3, 50.0)

    @property
    def uses_color(self) -> bool:
        """Whether the colour stage (jitter or grayscale) can change this view."""
        jitter = self.jitter_p > 0 and max(self.brightness, self.contrast, self.saturation, self.hue) > 0
        return jitter or self.grayscale_p > 0


@dataclass(frozen=True)
class MultiCropSpec:
    """The views of every sample: ``views[:num_global]`` are the global crops (one size), then locals.

    ``mean``/``std`` are per channel on the 0..1 scale (ImageNet's by default).
    """

    views: tuple[ViewSpec, ...]
    num_global: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.views:
            raise PipelineError("a MultiCropSpec needs at least one view")
        if not 0 < self.num_global <= len(self.views):
            raise PipelineError(f"num_global={self.num_global} with {len(self.views)} views")
        if len({v.size for v in self.global_views}) != 1:
            raise PipelineError("all global views must have the same size")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise PipelineError(f"mean and std need 3 channels with std > 0, got {self.mean}, {self.std}")

    @property
    def global_views(self) -> tuple[ViewSpec, ...]:
        return self.views[: self.num_global]

    @property
    def local_views(self) -> tuple[ViewSpec, ...]:
        return self.views[self.num_global :]

    @property
    def is_eval(self) -> bool:
        return all(v.crop == "center" for v in self.views)

    @property
    def sizes(self) -> list[int]:
        return [v.size for v in self.views]

    def describe(self) -> str:
        """``swav: 2×224 + 6×96``."""
        parts = [f"{self.num_global}×{self.views[0].size}"]
        if self.local_views:
            parts.append(f"{len(self.local_views)}×{self.local_views[0].size}")
        return f"{self.name}: " + " + ".join(parts)

    @staticmethod
    def preset(
        name: str,
        *,
        global_size: int = 224,
        local_size: int = 96,
        num_global: int = 2,
        num_local: int | None = None,
        global_scale: tuple[float, float] | None = None,
        local_scale: tuple[float, float] | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> MultiCropSpec:
        """A named preset (``swav``, ``dino``, ``eval``) at the given sizes; see ``PRESETS``."""
        if name not in PRESETS:
            raise PipelineError(f"unknown augmentation preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name](
            PresetSizes(global_size, local_size, num_global, num_local, global_scale, local_scale),
            mean,
            std,
        )


@dataclass(frozen=True)
class PresetSizes:
    """The size-related knobs every preset takes (``None`` = the preset's own default)."""

    global_size: int
    local_size: int
    num_global: int
    num_local: int | None
    global_scale: tuple[float, float] | None
    local_scale: tuple[float, float] | None


def _swav(s: PresetSizes, mean: tuple[float, float, float], std: tuple[float, float, float]) -> MultiCropSpec:
    """SwAV (Caron et al. 2020): 2×224 (0.14-1) + 6×96 (0.05-0.14), jitter 0.8 with strength 0.8/0.2,
    grayscale 0.2, blur 0.5 on every crop."""
    common = dict(
        flip_p=0.5,
        jitter_p=0.8,
        brightness=0.8,
        contrast=0.8,
        saturation=0.8,
        hue=0.2,
        grayscale_p=0.2,
        blur_p=0.5,
    )
    glob = ViewSpec(s.global_size, scale=s.global_scale or (0.14, 1.0), **common)
    loc = ViewSpec(s.local_size, scale=s.local_scale or (0.05, 0.14), **common)
    num_local = 6 if s.num_local is None else s.num_local
    return MultiCropSpec((glob,) * s.num_global + (loc,) * num_local, s.num_global, mean, std, "swav")


def _dino(s: PresetSizes, mean: tuple[float, float, float], std: tuple[float, float, float]) -> MultiCropSpec:
    """DINO (Caron et al. 2021): 2×224 (0.4-1) + 8×96 (0.05-0.4), jitter 0.8 with 0.4/0.4/0.2/0.1,
    grayscale 0.2; blur 1.0 on the first global view, 0.1 on the second, 0.5 on locals; solarisation 0.2
    on the second global view only."""
    if s.num_global != 2:
        raise PipelineError("the dino preset has exactly 2 global views (their blur/solarisation differ)")
    common = dict(
        flip_p=0.5,
        jitter_p=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.2,
        hue=0.1,
        grayscale_p=0.2,
    )
    global_scale = s.global_scale or (0.4, 1.0)
    first = ViewSpec(s.global_size, scale=global_scale, blur_p=1.0, **common)
    second = ViewSpec(s.global_size, scale=global_scale, blur_p=0.1, solarize_p=0.2, **common)
    loc = ViewSpec(s.local_size, scale=s.local_scale or (0.05, 0.4), blur_p=0.5, **common)
    num_local = 8 if s.num_local is None else s.num_local
    return MultiCropSpec((first, second) + (loc,) * num_local, 2, mean, std, "dino")


def _eval(s: PresetSizes, mean: tuple[float, float, float], std: tuple[float, float, float]) -> MultiCropSpec:
    """Evaluation / feature extraction: one view, resize + centre crop, no randomness."""
    view = ViewSpec(s.global_size, crop="center", center_fraction=EVAL_CENTER_FRACTION)
    return MultiCropSpec((view,), 1, mean, std, "eval")


PRESETS: dict[str, Callable[..., MultiCropSpec]] = {"swav": _swav, "dino": _dino, "eval": _eval}


@dataclass
class AugmentConfig:
    """The ``augment:`` section of a training config: a preset plus overrides.

    Digits demo example: ``{preset: swav, global_size: 32, local_size: 16, flip_p: 0.0}``.
    """

    preset: str = "swav"
    """swav, dino or eval; the other keys adjust it."""
    global_size: int = 224
    """Side of the global crops in pixels (224 for ImageNet, 32 for the digits demo)."""
    local_size: int = 96
    """Side of the local crops; roughly 0.4 × global_size."""
    num_global: int = 2
    """Global crops per sample (dino needs 2)."""
    num_local: int | None = None
    """Local crops per sample (default: the preset's, 6 for swav, 8 for dino); 0 disables multi-crop."""
    global_scale: tuple[float, float] | None = None
    """Area fraction range of the global crops (default: the preset's). DINO ViTs like (0.4, 1), ResNets (0.14, 1)."""
    local_scale: tuple[float, float] | None = None
    """Area fraction range of the local crops (default: the preset's)."""
    flip_p: float | None = None
    """Horizontal flip probability (default 0.5); 0 for data where left/right matters (digits)."""
    blur_sigma: tuple[float, float] | None = None
    """Gaussian blur sigma range in pixels (default (0.1, 2.0), tuned for 224/96 px crops; scale it down
    with the crop sizes, e.g. (0.1, 0.3) for 32/16 px)."""
    jitter_p: float | None = None
    """Probability of the colour jitter (default 0.8). Lower it for data whose colours carry little (grey
    digits), where strong jitter mostly adds noise that one view cannot predict from another."""
    jitter: tuple[float, float, float, float] | None = None
    """Jitter strengths (brightness, contrast, saturation, hue) (default: swav (0.8, 0.8, 0.8, 0.2),
    dino (0.4, 0.4, 0.2, 0.1)); factors are drawn in [1 − s, 1 + s], hue in ±h turns."""
    grayscale_p: float | None = None
    """Probability of converting a view to grey (default 0.2); irrelevant for grey images."""
    solarize_p: float | None = None
    """Solarisation probability of the views the preset solarises (dino: the second global view, 0.2;
    swav solarises none). 0 for data where inverting the bright values erases the object (light ink on
    a dark background, like the digits)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean on the 0..1 scale used to normalise the views."""
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    """Per-channel standard deviation on the 0..1 scale."""

    def to_spec(self) -> MultiCropSpec:
        spec = MultiCropSpec.preset(
            self.preset,
            global_size=self.global_size,
            local_size=self.local_size,
            num_global=self.num_global,
            num_local=self.num_local,
            global_scale=self.global_scale,
            local_scale=self.local_scale,
            mean=self.mean,
            std=self.std,
        )
        overrides = {
            name: value
            for name, value in (
                ("flip_p", self.flip_p),
                ("blur_sigma", self.blur_sigma),
                ("jitter_p", self.jitter_p),
                ("grayscale_p", self.grayscale_p),
            )
            if value is not None
        }
        if self.jitter is not None:
            overrides.update(zip(("brightness", "contrast", "saturation", "hue"), self.jitter, strict=True))
        if overrides:
            views = tuple(
                dataclasses.replace(v, **overrides) if v.crop == "random" else v for v in spec.views
            )
            spec = dataclasses.replace(spec, views=views)
        if self.solarize_p is not None:
            spec = self._with_solarization(spec, self.solarize_p)
        return spec

    def _with_solarization(self, spec: MultiCropSpec, probability: float) -> MultiCropSpec:
        solarized = [i for i, view in enumerate(spec.views) if view.solarize_p > 0]
        if not solarized and probability > 0:
            raise PipelineError(
                f"augment.solarize_p: the {self.preset} preset solarises no view; only dino's can be changed"
            )
        views = tuple(
            dataclasses.replace(v, solarize_p=probability) if i in solarized else v
            for i, v in enumerate(spec.views)
        )
        return dataclasses.replace(spec, views=views)

    def eval_spec(self) -> MultiCropSpec:
        """The matching evaluation view (centre crop at ``global_size``), for extraction and k-NN."""
        return MultiCropSpec.preset("eval", global_size=self.global_size, mean=self.mean, std=self.std)


def resolve_spec(spec: MultiCropSpec | AugmentConfig | str) -> MultiCropSpec:
    """A spec from a spec, an ``AugmentConfig`` or a preset name (full ImageNet sizes)."""
    if isinstance(spec, MultiCropSpec):
        return spec
    if isinstance(spec, AugmentConfig):
        return spec.to_spec()
    if isinstance(spec, str):
        return MultiCropSpec.preset(spec)
    raise PipelineError(
        f"expected a MultiCropSpec, an AugmentConfig or a preset name, got {type(spec).__name__}"
    )


__all__ = [
    "DEFAULT_RATIO",
    "EVAL_CENTER_FRACTION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "AugmentConfig",
    "MultiCropSpec",
    "ViewSpec",
    "resolve_spec",
]
