"""Augmentation parameters and pixel ops: against hand-worked steps, direct references and the spec."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clusterssl.pipeline.data.augment import (
    LUMA,
    RGB_TO_YIQ,
    YIQ_TO_RGB,
    PixelOps,
    ViewParams,
    apply_color,
    center_boxes,
    color_matrices,
    draw_view_params,
    gaussian_blur,
    random_resized_boxes,
    sample_uniforms,
    solarize_,
)
from clusterssl.pipeline.data.spec import MultiCropSpec, ViewSpec


def test_uniforms_depend_only_on_the_sample_key() -> None:
    batch = sample_uniforms(1, 2, np.array([5, 7, 5]), np.array([0, 0, 1]), 3)
    alone = sample_uniforms(1, 2, np.array([5]), np.array([0]), 3)
    assert batch.shape == (3, 3, 32) and ((batch >= 0) & (batch < 1)).all()
    np.testing.assert_array_equal(batch[0], alone[0])  # neighbours in the batch do not matter
    assert not np.allclose(batch[0], batch[2])  # a repeat gets other draws
    assert not np.allclose(batch[0], sample_uniforms(1, 3, np.array([5]), np.array([0]), 3)[0])  # epoch
    assert not np.allclose(batch[0], sample_uniforms(2, 2, np.array([5]), np.array([0]), 3)[0])  # seed
    assert not np.allclose(batch[0, 0], batch[0, 1])  # views


def test_uniforms_are_uniform_and_uncorrelated() -> None:
    u = sample_uniforms(0, 0, np.arange(20000), np.zeros(20000, np.int64), 1)[:, 0]  # (20000, 32)
    n = u.size
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 0.002
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts - n / 10) < 5 * math.sqrt(n / 10))
    correlation = np.corrcoef(u[:, 0], u[:, 1])[0, 1]
    assert abs(correlation) < 5 / math.sqrt(len(u))
    neighbours = np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]  # consecutive indices
    assert abs(neighbours) < 5 / math.sqrt(len(u))


def test_color_matrices_identity_and_grayscale() -> None:
    ones = np.ones(1)
    lin, off = color_matrices(ones, ones, ones, np.zeros(1))
    np.testing.assert_allclose(lin[0], np.eye(3), atol=1e-6)
    np.testing.assert_allclose(off[0], 0, atol=1e-6)
    lin, off = color_matrices(ones, ones, np.zeros(1), np.array([0.1]))
    np.testing.assert_allclose(lin[0], np.tile(LUMA, (3, 1)), atol=1e-6)  # every channel = luma
    np.testing.assert_allclose(YIQ_TO_RGB[:, 0], 1.0, atol=1e-12)


def _stepwise_color(image: np.ndarray, b: float, c: float, s: float, hue: float) -> np.ndarray:
    """The colour stage done step by step on (3, H, W) values, as the spec defines it."""
    x = b * image
    mean_luma = np.tensordot(LUMA, x, axes=1).mean()
    x = c * x + (1 - c) * mean_luma
    yiq = np.tensordot(RGB_TO_YIQ, x, axes=1)
    theta = 2 * np.pi * hue
    i, q = yiq[1].copy(), yiq[2].copy()
    yiq[1] = s * (np.cos(theta) * i + np.sin(theta) * q)
    yiq[2] = s * (-np.sin(theta) * i + np.cos(theta) * q)
    return np.clip(np.tensordot(YIQ_TO_RGB, yiq, axes=1), 0, 255)


@pytest.mark.parametrize(
    ("b", "c", "s", "hue"), [(1.5, 0.5, 0.7, 0.25), (0.6, 1.7, 1.4, -0.1), (1.0, 0.0, 1.0, 0.0)]
)
def test_apply_color_equals_the_stepwise_definition(b: float, c: float, s: float, hue: float) -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (3, 6, 7))
    lin, off = color_matrices(np.array([b]), np.array([c]), np.array([s]), np.array([hue]))
    x = torch.tensor(image[None], dtype=torch.float32)
    out = apply_color(x, torch.from_numpy(lin), torch.from_numpy(off), torch.empty_like(x))
    np.testing.assert_allclose(out[0].numpy(), _stepwise_color(image, b, c, s, hue), atol=2e-3)
    if c == 0.0:  # zero contrast around the mean luma: a flat image at that luma
        np.testing.assert_allclose(out[0].numpy(), np.tensordot(LUMA, image, axes=1).mean(), atol=2e-3)


def test_hue_and_saturation_keep_the_luma() -> None:
    rng = np.random.default_rng(1)
    image = rng.uniform(40, 200, (3, 5, 5))
    lin, off = color_matrices(np.ones(1), np.ones(1), np.array([0.5]), np.array([0.3]))
    x = torch.tensor(image[None], dtype=torch.float32)
    out = apply_color(x, torch.from_numpy(lin), torch.from_numpy(off), torch.empty_like(x))[0].numpy()
    np.testing.assert_allclose(np.tensordot(LUMA, out, axes=1), np.tensordot(LUMA, image, axes=1), atol=1e-3)


def _reference_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = math.ceil(3 * sigma)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image, ((0, 0), (radius, radius), (radius, radius)), mode="reflect")  # reflect-101
    h, w = image.shape[1:]
    rows = sum(kernel[k] * padded[:, :, k : k + w] for k in range(len(kernel)))
    return sum(kernel[k] * rows[:, k : k + h, :] for k in range(len(kernel)))


@pytest.mark.parametrize(("height", "width"), [(20, 24), (32, 32), (37, 50)])
def test_gaussian_blur_equals_a_direct_convolution(height: int, width: int) -> None:
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, (4, 3, height, width))
    sigmas = np.array([0.4, 1.3, 2.0, 0.1])
    out = gaussian_blur(torch.tensor(images, dtype=torch.float32), sigmas).numpy()
    for image, sigma, blurred in zip(images, sigmas, out, strict=True):
        np.testing.assert_allclose(blurred, _reference_blur(image, sigma), atol=2e-3)
    single = gaussian_blur(torch.tensor(images[1:2], dtype=torch.float32), sigmas[1:2])
    np.testing.assert_allclose(single[0].numpy(), out[1], atol=1e-3)  # batch-mates change nothing
    flat = torch.full((1, 3, 9, 9), 77.0)
    torch.testing.assert_close(gaussian_blur(flat, np.array([1.5])), flat)


def test_solarize_inverts_values_from_128() -> None:
    x = torch.tensor([0.0, 127.0, 128.0, 200.0, 255.0]).view(1, 1, 1, 5).repeat(1, 3, 1, 1)
    np.testing.assert_array_equal(solarize_(x)[0, 0, 0].numpy(), [0.0, 127.0, 127.0, 55.0, 0.0])


def test_random_boxes_respect_scale_ratio_and_bounds() -> None:
    n = 4000
    rng = np.random.default_rng(3)
    height = rng.integers(40, 400, n)
    width = np.clip((height * rng.uniform(0.75, 4 / 3, n)).astype(np.int64), 1, None)  # aspect in range
    view = ViewSpec(32, scale=(0.14, 1.0))
    u = sample_uniforms(0, 0, np.arange(n), np.zeros(n, np.int64), 1)[:, 0]
    top, left, h, w = random_resized_boxes(view, u, height, width)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # Area and aspect ratio within range, up to rounding the sides to whole pixels (the fallback for
    # these images, the whole image, is within range too).
    slack = (0.5 * (h + w) + 0.25) / (height * width)
    assert (h * w / (height * width) >= 0.14 - slack).all()
    rounding = 0.5 / h + 0.5 / w
    assert (w / h >= 0.75 * (1 - rounding) - 1e-9).all() and (w / h <= 4 / 3 * (1 + rounding) + 1e-9).all()
    # Positions spread over the whole free range: both ends are reached.
    free = height - h
    assert (top[free > 50] < free[free > 50] * 0.1).any() and (top[free > 50] > free[free > 50] * 0.9).any()


def test_random_box_falls_back_to_a_centred_crop() -> None:
    view = ViewSpec(32, scale=(0.9, 1.0))
    u = sample_uniforms(0, 0, np.arange(50), np.zeros(50, np.int64), 1)[:, 0]
    top, left, h, w = random_resized_boxes(view, u, np.full(50, 10), np.full(50, 400))
    # No (area >= 0.9, ratio <= 4/3) box fits a 10×400 strip: the widest allowed box, centred.
    assert (h == 10).all() and (w == 13).all() and (top == 0).all() and (left == (400 - 13) // 2).all()


def test_center_boxes_are_the_eval_crop() -> None:
    top, left, h, w = center_boxes(np.array([256, 300]), np.array([256, 400]), 0.875)
    assert h.tolist() == w.tolist() == [224, 262]
    assert top.tolist() == [16, 19] and left.tolist() == [16, 69]


def test_parameter_frequencies_match_the_spec() -> None:
    n = 20000
    view = MultiCropSpec.preset("dino").views[1]  # blur 0.1, solarise 0.2, jitter 0.8, gray 0.2
    u = sample_uniforms(5, 0, np.arange(n), np.zeros(n, np.int64), 1)[:, 0]
    p = draw_view_params(view, u, np.full(n, 300), np.full(n, 400))
    gray = np.isclose(p.lin[:, 0], p.lin[:, 1], atol=1e-6).all(axis=1) & np.isclose(
        p.lin[:, 1], p.lin[:, 2], atol=1e-6
    ).all(axis=1)
    jitter = ~np.isclose(p.lin, np.eye(3), atol=1e-6).reshape(n, -1).all(axis=1) & ~gray
    tolerance = 4 * math.sqrt(0.25 / n)
    assert abs(p.flip.mean() - 0.5) < tolerance
    assert abs(gray.mean() - 0.2) < tolerance
    assert abs(jitter.mean() - 0.8 * 0.8) < tolerance  # jittered and not grayscaled
    assert abs((p.sigma > 0).mean() - 0.1) < tolerance
    assert ((p.sigma[p.sigma > 0] >= 0.1) & (p.sigma[p.sigma > 0] <= 2.0)).all()
    assert abs(p.solarize.mean() - 0.2) < tolerance
    assert abs(p.color.mean() - (1 - 0.2 * 0.8)) < tolerance  # jitter or gray


def _params(n: int, seed: int = 0) -> ViewParams:
    view = ViewSpec(
        8, jitter_p=0.8, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1, blur_p=0.5, solarize_p=0.5
    )
    u = sample_uniforms(seed, 0, np.arange(n), np.zeros(n, np.int64), 1)[:, 0]
    return draw_view_params(view, u, np.full(n, 30), np.full(n, 30))


def test_pixel_ops_are_colour_then_blur_then_solarise_then_normalise() -> None:
    n = 6
    rng = np.random.default_rng(4)
    crops = torch.from_numpy(rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8))
    params = _params(n)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    expected = crops.float()
    expected = apply_color(
        expected, torch.from_numpy(params.lin), torch.from_numpy(params.off), expected.clone()
    )
    expected = torch.where(torch.from_numpy(params.color).view(n, 1, 1, 1), expected, crops.float())
    for i in np.flatnonzero(params.sigma > 0):
        expected[i] = gaussian_blur(expected[i : i + 1], params.sigma[i : i + 1])[0]
    for i in np.flatnonzero(params.solarize):
        expected[i] = solarize_(expected[i : i + 1])[0]
    expected = (expected / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    for chunk in (1, 4, None):
        out = PixelOps(mean, std).finish(crops, params, chunk=chunk)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_pixel_ops_of_the_mean_colour_is_zero() -> None:
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    crops = torch.tensor([102, 127.5, 153]).round().to(torch.uint8).view(1, 3, 1, 1).repeat(1, 1, 4, 4)
    identity = draw_view_params(
        ViewSpec(4), sample_uniforms(0, 0, np.zeros(1), np.zeros(1), 1)[:, 0], [4], [4]
    )
    out = PixelOps(mean, std).finish(crops, identity)
    assert out.abs().max() < 0.5 / 255 / 0.2 + 1e-6


def test_pixel_ops_reproduce_the_recorded_views_of_a_seed() -> None:
    """Numbers recorded from the pixel ops of a seed (two chunks, each blurring and solarising some of its
    samples): a rework of where the ops run must leave the views as they were."""
    n = 6
    crops = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (n, 3, 16, 16), dtype=np.uint8))
    out = PixelOps((0.4, 0.5, 0.6), (0.2, 0.25, 0.3)).finish(crops, _params(n, seed=7), chunk=4).double()
    ramp = torch.arange(16, dtype=torch.float64)
    sums = out.sum(dim=(1, 2, 3))
    moments = (out * ramp).sum(dim=(1, 2, 3)) + 0.5 * (out * ramp[:, None]).sum(dim=(1, 2, 3))
    recorded_sums = [-247.4403, 27.2786, -704.3626, -171.5542, -681.8454, -109.8635]
    recorded_moments = [-2864.9346, 12.2381, -7966.7011, -1983.525, -7442.1512, -1573.1558]
    np.testing.assert_allclose(sums.numpy(), recorded_sums, atol=2e-3)
    np.testing.assert_allclose(moments.numpy(), recorded_moments, atol=2e-2)
