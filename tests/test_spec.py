"""Multi-crop specs: the presets are exactly the SwAV and DINO papers' recipes; overrides work."""

from __future__ import annotations

import pytest

from clusterssl.errors import PipelineError
from clusterssl.pipeline.data.spec import IMAGENET_MEAN, AugmentConfig, MultiCropSpec, ViewSpec, resolve_spec


def test_swav_preset_is_the_papers_recipe() -> None:
    spec = MultiCropSpec.preset("swav")
    assert spec.num_global == 2 and spec.sizes == [224] * 2 + [96] * 6
    assert spec.describe() == "swav: 2×224 + 6×96"
    for view in spec.global_views:
        assert view.scale == (0.14, 1.0)
    for view in spec.local_views:
        assert view.scale == (0.05, 0.14)
    for view in spec.views:
        assert (view.flip_p, view.jitter_p, view.grayscale_p, view.blur_p, view.solarize_p) == (
            0.5,
            0.8,
            0.2,
            0.5,
            0.0,
        )
        assert (view.brightness, view.contrast, view.saturation, view.hue) == (0.8, 0.8, 0.8, 0.2)
        assert view.blur_sigma == (0.1, 2.0) and view.crop == "random"


def test_dino_preset_blurs_and_solarises_per_view() -> None:
    spec = MultiCropSpec.preset("dino", num_local=4)
    assert spec.sizes == [224, 224, 96, 96, 96, 96]
    first, second, *local = spec.views
    assert (first.blur_p, first.solarize_p) == (1.0, 0.0)
    assert (second.blur_p, second.solarize_p) == (0.1, 0.2)
    assert all((v.blur_p, v.solarize_p, v.scale) == (0.5, 0.0, (0.05, 0.4)) for v in local)
    assert first.scale == second.scale == (0.4, 1.0)
    for view in spec.views:
        assert (view.brightness, view.contrast, view.saturation, view.hue) == (0.4, 0.4, 0.2, 0.1)
        assert (view.jitter_p, view.grayscale_p, view.flip_p) == (0.8, 0.2, 0.5)
    assert len(MultiCropSpec.preset("dino").local_views) == 8  # DINO's default local_crops_number
    assert MultiCropSpec.preset("dino", global_scale=(0.25, 1.0)).views[0].scale == (0.25, 1.0)


def test_eval_preset_has_no_randomness() -> None:
    spec = MultiCropSpec.preset("eval", global_size=32)
    (view,) = spec.views
    assert spec.is_eval and view.size == 32 and view.crop == "center" and view.center_fraction == 0.875
    assert not view.uses_color and view.flip_p == view.blur_p == view.solarize_p == 0.0


def test_sizes_are_parameters() -> None:
    spec = MultiCropSpec.preset("swav", global_size=32, local_size=16, num_local=4)
    assert spec.sizes == [32, 32, 16, 16, 16, 16]
    assert MultiCropSpec.preset("swav", num_local=0).sizes == [224, 224]


def test_augment_config_overrides_and_eval_spec() -> None:
    config = AugmentConfig(
        preset="swav",
        global_size=32,
        local_size=16,
        num_local=2,
        flip_p=0.0,
        global_scale=(0.3, 1.0),
        blur_sigma=(0.1, 0.3),
    )
    spec = config.to_spec()
    assert spec.sizes == [32, 32, 16, 16]
    assert all(v.flip_p == 0.0 and v.blur_sigma == (0.1, 0.3) and v.blur_p == 0.5 for v in spec.views)
    assert spec.views[0].scale == (0.3, 1.0) and spec.views[2].scale == (0.05, 0.14)
    assert spec.mean == IMAGENET_MEAN
    evaluation = config.eval_spec()
    assert evaluation.is_eval and evaluation.sizes == [32]
    assert resolve_spec(config) == spec
    assert resolve_spec("dino") == MultiCropSpec.preset("dino")


def test_augment_config_colour_overrides_reach_every_random_view_and_keep_the_rest() -> None:
    """jitter_p, jitter strengths and grayscale_p replace the preset's on every random view; the
    per-view blur/solarisation of the dino preset are untouched, and unset knobs keep the preset;
    solarize_p changes only the views the preset solarises."""
    spec = AugmentConfig(
        preset="dino",
        global_size=32,
        local_size=16,
        jitter_p=0.3,
        jitter=(0.5, 0.4, 0.0, 0.0),
        grayscale_p=0.0,
    ).to_spec()
    for view in spec.views:
        assert (view.jitter_p, view.brightness, view.contrast, view.saturation, view.hue) == (
            0.3,
            0.5,
            0.4,
            0.0,
            0.0,
        )
        assert view.grayscale_p == 0.0
    assert [v.blur_p for v in spec.views[:3]] == [1.0, 0.1, 0.5]
    assert [v.solarize_p for v in spec.views[:3]] == [0.0, 0.2, 0.0]
    untouched = AugmentConfig(preset="swav", jitter_p=0.0).to_spec().views[0]
    assert (untouched.jitter_p, untouched.brightness, untouched.grayscale_p) == (0.0, 0.8, 0.2)
    assert not AugmentConfig(preset="swav", jitter_p=0.0, grayscale_p=0.0).to_spec().views[0].uses_color
    solarised = AugmentConfig(preset="dino", solarize_p=0.5).to_spec()
    assert [v.solarize_p for v in solarised.views] == [0.0, 0.5] + [0.0] * 8
    off = AugmentConfig(preset="dino", solarize_p=0.0).to_spec()
    assert all(v.solarize_p == 0.0 for v in off.views)
    assert AugmentConfig(preset="swav", solarize_p=0.0).to_spec() == AugmentConfig(preset="swav").to_spec()
    with pytest.raises(PipelineError, match="solarises no view"):
        AugmentConfig(preset="swav", solarize_p=0.2).to_spec()
    with pytest.raises(PipelineError, match="jitter_p must be a probability"):
        AugmentConfig(jitter_p=1.5).to_spec()
    with pytest.raises(PipelineError, match="hue strength"):
        AugmentConfig(jitter=(0.4, 0.4, 0.4, 0.7)).to_spec()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: MultiCropSpec.preset("simclr"),
            "unknown augmentation preset 'simclr'; known: dino, eval, swav",
        ),
        (lambda: MultiCropSpec.preset("dino", num_global=3), "exactly 2 global views"),
        (lambda: ViewSpec(32, scale=(0.5, 0.2)), "scale must be a range"),
        (lambda: ViewSpec(32, flip_p=1.5), "flip_p must be a probability"),
        (lambda: ViewSpec(32, hue=0.7), "hue strength"),
        (lambda: MultiCropSpec((ViewSpec(32), ViewSpec(16)), 2), "same size"),
        (lambda: MultiCropSpec((ViewSpec(32),), 1, std=(0.2, 0.0, 0.2)), "std > 0"),
    ],
)
def test_bad_specs_fail_with_one_clear_message(make: object, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        make()  # type: ignore[operator]
