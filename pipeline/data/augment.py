"""Augmentation parameters, drawn once for both backends, and the batched pixel ops of the torch backend.

Randomness is a pure function of ``(seed, epoch, global index, repeat, view, draw)``: a counter-based
hash (SplitMix64) turns that key into uniforms, vectorised over a batch. Nothing depends on which worker,
rank or batch position a sample lands in, so

* the views of a sample do not change with the number of workers or ranks,
* resuming mid-epoch needs no replay (skipped samples are neither read nor decoded),
* the DALI backend is fed the very same parameters and produces the same views as the torch backend,
  up to interpolation rounding.

Per view the parameters are (see ``clusterssl.pipeline.data.spec`` for the semantics):

    box      (top, left, height, width) in pixels of the decoded image
    flip     horizontal flip
    colour   one affine map per sample: out = lin @ rgb + mu * off, mu the crop's mean luma. Brightness,
             contrast (around the mean luma: mean luma is affine in the pixels, hence the mu term),
             saturation and hue (YIQ: scale and rotate the chroma plane) and grayscale (saturation 0)
             all compose into this one 3×3 matrix + offset, applied in a single pass, then clamped
    blur     sigma in pixels (0 = none), separable kernel of radius ceil(3 sigma), reflect-101 borders
    solarize invert values >= 128
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clusterssl.pipeline.data.spec import MultiCropSpec, ViewSpec

# --- counter-based random numbers -----------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1

CROP_ATTEMPTS = 10
"""RandomResizedCrop tries this many (area, ratio) pairs before falling back to a centre crop."""

# Layout of the uniforms each view consumes (fixed, so a parameter never shifts the others' draws).
_AREA = slice(0, CROP_ATTEMPTS)
_LOG_RATIO = slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)
_TOP, _LEFT, _FLIP = 20, 21, 22
_JITTER, _BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 23, 24, 25, 26, 27
_GRAY, _BLUR, _SIGMA, _SOLARIZE = 28, 29, 30, 31
DRAWS_PER_VIEW = 32


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective 64-bit mix (uint64 arrays; wrap-around is intended)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _u64(value: int | np.ndarray) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.astype(np.int64).astype(np.uint64)
    return np.asarray(value & _MASK64, dtype=np.uint64)


def sample_uniforms(
    seed: int, epoch: int, index: np.ndarray, repeat: np.ndarray, num_views: int
) -> np.ndarray:
    """Uniforms in [0, 1) for every (sample, view, draw): (n, num_views, DRAWS_PER_VIEW) float64.

    ``index``/``repeat``: (n,) global sample index and repeat number (0 for a sample's first occurrence
    in the epoch). The result for a sample depends on nothing else.
    """
    with np.errstate(over="ignore"):
        key = _splitmix(_u64(seed) * _GOLDEN + _u64(epoch))
        key = _splitmix(key + _u64(np.asarray(index)) * _GOLDEN)
        key = _splitmix(key + _u64(np.asarray(repeat)) * _GOLDEN)
        counters = np.arange(1, num_views * DRAWS_PER_VIEW + 1, dtype=np.uint64) * _GOLDEN
        bits = _splitmix(key[:, None] + counters[None, :])
    uniforms = (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return uniforms.reshape(len(key), num_views, DRAWS_PER_VIEW)


# --- colour algebra -------------------------------------------------------------------------------------

RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64
)
"""NTSC YIQ. The chroma rows sum to 0, so gray stays gray under any hue/saturation change."""
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)
LUMA = RGB_TO_YIQ[0]


def color_matrices(
    brightness: np.ndarray, contrast: np.ndarray, saturation: np.ndarray, hue_turns: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The affine colour map ``out = lin @ rgb + mu * off`` of each sample: lin (n, 3, 3), off (n, 3).

    Applied in order: brightness b (x → b x), contrast c around the mean luma (x → c x + (1 - c) b mu,
    mu the luma mean before brightness), then hue and saturation as a rotation by 2π·hue and a scaling
    by s of the YIQ chroma plane. Grayscale is saturation 0 (the YIQ→RGB first column is all ones, so
    every channel becomes the luma).
    """
    n = len(brightness)
    theta = 2.0 * np.pi * np.asarray(hue_turns, dtype=np.float64)
    chroma = np.zeros((n, 3, 3))
    chroma[:, 0, 0] = 1.0
    chroma[:, 1, 1] = saturation * np.cos(theta)
    chroma[:, 1, 2] = saturation * np.sin(theta)
    chroma[:, 2, 1] = -saturation * np.sin(theta)
    chroma[:, 2, 2] = saturation * np.cos(theta)
    hue_sat = YIQ_TO_RGB @ chroma @ RGB_TO_YIQ
    lin = (brightness * contrast)[:, None, None] * hue_sat
    off = (brightness * (1.0 - contrast))[:, None] * hue_sat.sum(axis=2)
    return lin.astype(np.float32), off.astype(np.float32)


# --- per-view parameters --------------------------------------------------------------------------------


@dataclass
class ViewParams:
    """The random parameters of one view for n samples (numpy, shipped with the batch)."""

    top: np.ndarray  # (n,) int64, box in pixels of the decoded image
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    flip: np.ndarray  # (n,) bool
    color: np.ndarray  # (n,) bool: the colour map is not the identity
    lin: np.ndarray  # (n, 3, 3) float32
    off: np.ndarray  # (n, 3) float32
    sigma: np.ndarray  # (n,) float32, 0 = no blur
    solarize: np.ndarray  # (n,) bool

    def __len__(self) -> int:
        return len(self.top)


def center_boxes(
    height: np.ndarray, width: np.ndarray, fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The centred square of side ``fraction`` × the shorter side: (top, left, h, w), each (n,)."""
    side = np.clip(np.rint(np.minimum(height, width) * fraction).astype(np.int64), 1, None)
    side = np.minimum(side, np.minimum(height, width))
    return (height - side) // 2, (width - side) // 2, side, side


def random_resized_boxes(
    view: ViewSpec, u: np.ndarray, height: np.ndarray, width: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torchvision's RandomResizedCrop box, vectorised: (top, left, h, w), each (n,).

    Try CROP_ATTEMPTS (area fraction, log-uniform aspect ratio) pairs and keep the first that fits;
    if none fits, take the largest centred box whose aspect ratio is within ``view.ratio``.
    """
    area = (height * width).astype(np.float64)[:, None]
    target = area * (view.scale[0] + (view.scale[1] - view.scale[0]) * u[:, _AREA])
    log_lo, log_hi = math.log(view.ratio[0]), math.log(view.ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, _LOG_RATIO])
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.argmax(axis=1)
    rows = np.arange(len(height))
    h, w, found = h[rows, first], w[rows, first], fits.any(axis=1)

    # Fallback: the whole image, its aspect ratio clamped to the allowed range, centred.
    in_ratio = width / height
    narrow, wide = in_ratio < view.ratio[0], in_ratio > view.ratio[1]
    fallback_w = np.where(wide, np.rint(height * view.ratio[1]).astype(np.int64), width)
    fallback_h = np.where(narrow, np.rint(width / view.ratio[0]).astype(np.int64), height)
    h = np.where(found, h, np.clip(fallback_h, 1, height))
    w = np.where(found, w, np.clip(fallback_w, 1, width))

    top = np.where(found, np.floor(u[:, _TOP] * (height - h + 1)).astype(np.int64), (height - h) // 2)
    left = np.where(found, np.floor(u[:, _LEFT] * (width - w + 1)).astype(np.int64), (width - w) // 2)
    return top, left, h, w


def _factor(strength: float, u: np.ndarray) -> np.ndarray:
    """A jitter factor uniform in [max(0, 1 - strength), 1 + strength]."""
    low = max(0.0, 1.0 - strength)
    return low + (1.0 + strength - low) * u


def draw_view_params(view: ViewSpec, u: np.ndarray, height: np.ndarray, width: np.ndarray) -> ViewParams:
    """Parameters of one view for n samples from their uniforms u (n, DRAWS_PER_VIEW)."""
    height, width = np.asarray(height, dtype=np.int64), np.asarray(width, dtype=np.int64)
    n = len(height)
    if view.crop == "center":
        top, left, h, w = center_boxes(height, width, view.center_fraction)
    else:
        top, left, h, w = random_resized_boxes(view, u, height, width)

    jitter = u[:, _JITTER] < view.jitter_p
    ones = np.ones(n)
    brightness = np.where(jitter, _factor(view.brightness, u[:, _BRIGHTNESS]), ones)
    contrast = np.where(jitter, _factor(view.contrast, u[:, _CONTRAST]), ones)
    saturation = np.where(jitter, _factor(view.saturation, u[:, _SATURATION]), ones)
    hue = np.where(jitter, view.hue * (2.0 * u[:, _HUE] - 1.0), 0.0)
    gray = u[:, _GRAY] < view.grayscale_p
    lin, off = color_matrices(brightness, contrast, np.where(gray, 0.0, saturation), hue)

    blur = u[:, _BLUR] < view.blur_p
    sigma = view.blur_sigma[0] + (view.blur_sigma[1] - view.blur_sigma[0]) * u[:, _SIGMA]
    return ViewParams(
        top=top,
        left=left,
        height=h,
        width=w,
        flip=u[:, _FLIP] < view.flip_p,
        color=(jitter | gray) & view.uses_color,
        lin=lin,
        off=off,
        sigma=np.where(blur, sigma, 0.0).astype(np.float32),
        solarize=u[:, _SOLARIZE] < view.solarize_p,
    )


def draw_params(
    spec: MultiCropSpec,
    seed: int,
    epoch: int,
    index: np.ndarray,
    repeat: np.ndarray,
    height: np.ndarray,
    width: np.ndarray,
) -> list[ViewParams]:
    """Parameters of every view of n samples, given their keys and decoded image sizes."""
    uniforms = sample_uniforms(seed, epoch, index, repeat, len(spec.views))
    return [draw_view_params(view, uniforms[:, v], height, width) for v, view in enumerate(spec.views)]


# --- batched pixel ops (torch, any device) --------------------------------------------------------------
#
# On a GPU every read of a device tensor (``.cpu()``, ``.item()``, ``bool(t)``) makes the host wait for the
# queued work, and every upload from pageable memory waits too. So the host decides everything from its
# own numpy parameters (which samples get colour, blur or solarisation), the per-view device inputs cross
# in one pinned copy (``upload_pixel_params``), and the constants are made once per device
# (``DeviceConstants``): nothing in ``PixelOps.finish`` waits on the device.


class DeviceConstants:
    """The pixel ops' constant tensors, made once per (device, dtype) and reused by every batch."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        self.mean, self.std = mean, std
        self._normalization: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._luma: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def normalization(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``normalization(mean, std, device)``, made on the first call for ``device``."""
        if device not in self._normalization:
            self._normalization[device] = normalization(self.mean, self.std, device)
        return self._normalization[device]

    def luma(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(3,) the luma weights, made on the first call for ``(device, dtype)``."""
        key = (device, dtype)
        if key not in self._luma:
            self._luma[key] = torch.as_tensor(LUMA, dtype=dtype, device=device)
        return self._luma[key]


_UPLOAD_ALIGN = 64
"""Byte alignment of each array in an upload (that of a fresh torch allocation, so kernels see the same)."""


def upload_arrays(arrays: list[np.ndarray], device: torch.device) -> list[Tensor]:
    """The arrays as tensors on ``device``, sent in one copy: packed into one host buffer (pinned for a
    GPU, so the copy is asynchronous), each at an aligned offset, then viewed back on the device."""
    offsets, total = [], 0
    for array in arrays:
        offsets.append(total)
        total += -(-array.nbytes // _UPLOAD_ALIGN) * _UPLOAD_ALIGN
    host = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    for array, start in zip(arrays, offsets, strict=True):
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        host[start : start + raw.size].copy_(torch.from_numpy(raw))
    moved = host.to(device, non_blocking=True)
    return [
        moved[start : start + array.nbytes].view(_torch_dtype(array)).view(array.shape)
        for array, start in zip(arrays, offsets, strict=True)
    ]


def _torch_dtype(array: np.ndarray) -> torch.dtype:
    return torch.from_numpy(array.reshape(-1)[:0]).dtype


@dataclass
class ChunkBlur:
    """The blur of one chunk of samples, on the device: kernel matrices, and which samples they blur."""

    kernels: Tensor  # (b, BLUR_BLOCK, window) float32, see ``blur_matrices``
    rows: Tensor | None  # (b,) int64 positions in the chunk; None = every sample of the chunk


@dataclass
class PixelParams:
    """The device inputs of one view's pixel ops (the decisions stay with the host's ``ViewParams``)."""

    lin: Tensor  # (n, 3, 3) float32
    off: Tensor  # (n, 3) float32
    solarize: Tensor  # (n,) bool
    blurs: list[ChunkBlur | None]  # one per chunk; None = no blur in that chunk


def upload_pixel_params(
    params: ViewParams, spans: list[tuple[int, int]], size: tuple[int, int], device: torch.device
) -> PixelParams:
    """One view's device inputs for chunks ``spans`` of (height, width) ``size`` images, in one copy."""
    chunk_blurs = [_blur_arrays(params.sigma[start:stop], size) for start, stop in spans]
    arrays = [params.lin, params.off, params.solarize, *itertools.chain.from_iterable(chunk_blurs)]
    sent = iter(upload_arrays(arrays, device))
    lin, off, solarize = next(sent), next(sent), next(sent)
    blurs = [
        ChunkBlur(next(sent), next(sent) if len(parts) == 2 else None) if parts else None
        for parts in chunk_blurs
    ]
    return PixelParams(lin=lin, off=off, solarize=solarize, blurs=blurs)


def _blur_arrays(sigma: np.ndarray, size: tuple[int, int]) -> list[np.ndarray]:
    """A chunk's blur inputs: [] for none, [kernels] when every sample is blurred, else [kernels, rows]."""
    blurred = np.flatnonzero(sigma > 0)
    kernels = blur_kernels(sigma[blurred], *size) if len(blurred) else None
    if kernels is None:
        return []
    return [kernels] if len(blurred) == len(sigma) else [kernels, blurred.astype(np.int64)]


def luma_mean(x: Tensor, luma: Tensor | None = None) -> Tensor:
    """(n, 3, H, W) → (n,) mean luma of each image (``luma``: the weights on x's device, if at hand)."""
    luma = torch.as_tensor(LUMA, dtype=x.dtype, device=x.device) if luma is None else luma
    return x.mean(dim=(2, 3)) @ luma


def apply_color(x: Tensor, lin: Tensor, off: Tensor, out: Tensor, luma: Tensor | None = None) -> Tensor:
    """``out = clamp(lin @ x + mean_luma(x) * off, 0, 255)`` per sample; x, out (n, 3, H, W) float."""
    n = x.shape[0]
    bias = (off * luma_mean(x, luma)[:, None]).unsqueeze(-1)
    torch.baddbmm(bias, lin, x.reshape(n, 3, -1), out=out.view(n, 3, -1))
    return out.clamp_(0.0, 255.0)


def blur_radius(sigma: float) -> int:
    """Kernel radius for sigma: ceil(3 sigma), the same rule as DALI's gaussian_blur."""
    return max(1, math.ceil(3.0 * sigma))


BLUR_BLOCK = 16
"""Output pixels per block of the blocked blur (see ``gaussian_blur``)."""


def blur_matrices(sigma: np.ndarray, radius: int, block: int = BLUR_BLOCK) -> np.ndarray:
    """(m, block, block + 2 radius) float32: row i holds sample j's Gaussian centred on column i + radius.

    Each sample keeps its own kernel — radius ceil(3 sigma) (at most ``radius``), weights
    exp(-d² / 2σ²) normalised over those taps — so wider blocks change nothing but the zeros.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    offsets = np.arange(-radius, radius + 1)
    own = np.minimum([blur_radius(s) for s in sigma], radius)
    weights = np.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2) * (
        np.abs(offsets)[None, :] <= own[:, None]
    )
    weights /= weights.sum(axis=1, keepdims=True)
    matrices = np.zeros((len(sigma), block, block + 2 * radius), np.float32)
    rows = np.arange(block)[:, None]
    matrices[:, rows, rows + np.arange(2 * radius + 1)[None, :]] = weights[:, None, :]
    return matrices


def blur_kernels(sigma: np.ndarray, height: int, width: int) -> np.ndarray | None:
    """The kernel matrices that blur (height, width) images with sigmas (m,) > 0, or None when the
    images are too small to blur (reflection needs a radius below the size). All samples share the
    largest radius (their own kernels are exact)."""
    radius = min(max(blur_radius(s) for s in sigma), min(height, width) - 1)
    return blur_matrices(sigma, radius) if radius >= 1 else None


def _padded(x: Tensor, dim: int, radius: int, size: int) -> Tensor:
    """Reflect-101 pad ``radius`` on both sides of ``dim`` (2 or 3), then zeros up to ``size``."""
    length = x.shape[dim]
    pad = (radius, radius, 0, 0) if dim == 3 else (0, 0, radius, radius)
    x = F.pad(x, pad, mode="reflect")
    extra = size - (length + 2 * radius)
    if extra > 0:  # only blocks past the end read these; their outputs are cut off
        x = F.pad(x, (0, extra, 0, 0) if dim == 3 else (0, 0, 0, extra))
    return x


def gaussian_blur(x: Tensor, sigma: np.ndarray) -> Tensor:
    """Blur each image of x (m, C, H, W) float with its own sigma (m,) > 0; reflect-101 borders."""
    kernels = blur_kernels(np.asarray(sigma), x.shape[2], x.shape[3])
    if kernels is None:
        return x.clone()
    return blur_with(x, torch.from_numpy(kernels).to(x.device))


def blur_with(x: Tensor, kernels: Tensor) -> Tensor:
    """Blur each image of x (m, C, H, W) float with its kernel matrices (m, block, window) on x's device.

    Separable, each axis as a blocked banded matrix product: the axis is cut into blocks of
    BLUR_BLOCK outputs, each block is (block × block+2r window) @ the sample's kernel matrix. That
    spends ~(16 + 2r) multiply-adds per pixel instead of 2r + 1, but as one GEMM per axis instead of
    2r + 1 memory-bound passes: measured 1.5-2x faster on a CPU than shifted sums, and one batched
    matmul per axis on a GPU.
    """
    m, c, h, w = x.shape
    block, window = kernels.shape[1], kernels.shape[2]
    radius = (window - block) // 2

    # Rows: windows along W, (m, C·H·blocks, window) @ (m, window, block).
    blocks = -(-w // block)
    padded = _padded(x, 3, radius, blocks * block + 2 * radius)
    s0, s1, s2, _ = padded.stride()
    windows = padded.as_strided((m, c, h, blocks, window), (s0, s1, s2, block, 1)).reshape(m, -1, window)
    rows = torch.bmm(windows, kernels.transpose(1, 2)).view(m, c, h, blocks * block)[..., :w]

    # Columns: windows along H, (block × window) @ (window × W) for every (sample, channel, block).
    blocks = -(-h // block)
    padded = _padded(rows, 2, radius, blocks * block + 2 * radius)
    s0, s1, _, s3 = padded.stride()
    windows = padded.as_strided((m, c, blocks, window, w), (s0, s1, block * s3 * w, w * s3, s3))
    columns = torch.matmul(kernels.view(m, 1, 1, block, window), windows)
    return columns.reshape(m, c, blocks * block, w)[:, :, :h]


def blur_chunk_(x: Tensor, blur: ChunkBlur) -> Tensor:
    """Apply one chunk's blur to x (m, C, H, W): in place on the chosen rows, or a new tensor for all."""
    if blur.rows is None:
        return blur_with(x, blur.kernels)
    return x.index_copy_(0, blur.rows, blur_with(x.index_select(0, blur.rows), blur.kernels))


def solarize_(x: Tensor, which: Tensor | None = None) -> Tensor:
    """Invert values >= 128 (PIL's solarize at threshold 128), in place on (m, 3, H, W) floats; only in
    the samples where ``which`` (m,) bool is set when given (a mask: no index crosses to the device)."""
    invert = x >= 128.0
    if which is not None:
        invert &= which.view(-1, 1, 1, 1)
    return torch.where(invert, 255.0 - x, x, out=x)


def normalization(
    mean: tuple[float, float, float], std: tuple[float, float, float], device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """(1, 3, 1, 1) shift and scale taking 0..255 values to ``(x / 255 - mean) / std``."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    scale_t = 1.0 / (torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0)
    return mean_t, scale_t


def default_chunk(x: Tensor) -> int:
    """Samples per pass: the whole batch on a GPU; on a CPU about 1 MiB of floats, so the several
    passes of the colour/blur chain hit the cache instead of memory (measured 2-3x faster)."""
    if x.is_cuda:
        return x.shape[0]
    per_sample = 4 * x[0].numel()
    return max(1, (1 << 20) // per_sample)


_MADV_HUGEPAGE = 14
_HUGE_PAGE_WORTH = 4 << 20


def fresh_float_tensor(shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """An uninitialised float32 tensor for views handed to the caller.

    On Linux CPUs the memory is advised for transparent huge pages: a new batch of views is tens of
    MB touched for the first time, and faulting it in 4 KiB pages cost as much as normalising it
    (measured: 0.6 vs 0.2 ms per 224×224 view). Elsewhere this is plain ``torch.empty``.
    """
    out = torch.empty(shape, dtype=torch.float32, device=device)
    nbytes = out.numel() * 4
    if out.device.type == "cpu" and nbytes >= _HUGE_PAGE_WORTH and sys.platform == "linux":
        start = (out.data_ptr() + 4095) & ~4095
        stop = (out.data_ptr() + nbytes) & ~4095
        with contextlib.suppress(OSError, AttributeError):  # a hint only
            _libc().madvise(
                ctypes.c_void_p(start), ctypes.c_size_t(stop - start), ctypes.c_int(_MADV_HUGEPAGE)
            )
    return out


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + chunk)) for start in range(0, n, chunk)]


class PixelOps:
    """The batched pixel ops of one normalisation, with their constants kept per device."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        self.constants = DeviceConstants(mean, std)

    def finish(
        self, x: Tensor, params: ViewParams, out: Tensor | None = None, chunk: int | None = None
    ) -> Tensor:
        """The pixel ops of one view, batched: colour, blur, solarise, then normalise.

        x: (n, 3, S, S) uint8 crops (already boxed, resized and flipped) on any device; returns (n, 3, S, S)
        float32 normalised, written into ``out`` when given. ``chunk`` samples go through the chain at a
        time in scratch buffers, and only the normalised result is written to ``out``. Which samples get
        colour, blur or solarisation is read from the host's ``params``, never from the device.
        """
        n, device = x.shape[0], x.device
        out = fresh_float_tensor(tuple(x.shape), device) if out is None else out
        spans = _chunks(n, min(n, chunk or default_chunk(x)))
        sent = upload_pixel_params(params, spans, (x.shape[2], x.shape[3]), device)
        shift, scale = self.constants.normalization(device)
        luma = self.constants.luma(device, torch.float32)
        first = torch.empty((spans[0][1], *x.shape[1:]), dtype=torch.float32, device=device)
        second = torch.empty_like(first) if params.color.any() else first
        for (start, stop), blur in zip(spans, sent.blurs, strict=True):
            m = stop - start
            current = first[:m].copy_(x[start:stop])
            if params.color[start:stop].any():
                current = apply_color(current, sent.lin[start:stop], sent.off[start:stop], second[:m], luma)
            if blur is not None:
                current = blur_chunk_(current, blur)
            solarized = params.solarize[start:stop]
            if solarized.any():
                solarize_(current, None if solarized.all() else sent.solarize[start:stop])
            torch.sub(current, shift, out=out[start:stop]).mul_(scale)
        return out
