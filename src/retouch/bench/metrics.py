"""Pixel metrics of PIE-Bench's evaluator, written out in torch (no torchmetrics), and the structure distance.

PIE-Bench (Ju et al., ICLR'24; ``evaluation/evaluate.py`` and ``evaluation/matrics_calculator.py`` of
cure-lab/PnPInversion) computes its background metrics on **full frames in which the edit region is zeroed in
both images**: ``img / 255 * (1 - mask3)``. PSNR and MSE therefore average the squared error over *every*
pixel, the zeroed ones included, which inflates PSNR (and deflates MSE) by the fraction of the frame that is
background. :func:`pie_background_metrics` reproduces that exactly; :func:`background_only_metrics` is the
corrected variant that averages over the background pixels only. When the background is empty (the mask covers
the whole frame, e.g. style edits) PIE writes the string ``"nan"``; here the value is ``None``.

The torchmetrics definitions reproduced (torchmetrics 1.x, the versions PIE's evaluator ran with agree on these):

* ``MeanSquaredError``: ``mean((x - y)^2)`` over all elements.
* ``PeakSignalNoiseRatio(data_range=1)``: ``10 log10(1 / mse)`` over all elements of the batch (``inf`` when
  equal; see :data:`PSNR_CAP`).
* ``StructuralSimilarityIndexMeasure(data_range=1)``: Gaussian window 11x11, sigma 1.5, ``k1 = 0.01``,
  ``k2 = 0.03``; local statistics by a depthwise convolution; the variances are clamped at 0; the SSIM map is
  averaged over the positions whose window lies fully inside the image (torchmetrics reflect-pads by 5 and then
  crops 5 pixels off every side, which is the same thing), then over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "PSNR_CAP",
    "as_uint8",
    "background_only_metrics",
    "cap_psnr",
    "gaussian_window",
    "mse",
    "pie_background_metrics",
    "psnr",
    "psnr_uint8",
    "self_similarity",
    "ssim",
    "structure_distance_from_keys",
    "to_unit_tensor",
]

PSNR_CAP = 100.0
"""PSNR values are stored capped at 100 dB, so that identical images (PSNR = inf) stay valid JSON and means stay
finite. Only near-identical frames reach it (one 8-bit level on one value of a 64x64 RGB frame is ~89 dB, of a
512x512 one ~107 dB); a mean over capped values is then a lower bound of the uncapped one (which PIE reports as
inf)."""


def as_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image as a uint8 ``[H, W, 3]`` array (PIL images are converted to RGB)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {arr.dtype} {arr.shape}")
    return arr


def to_unit_tensor(image: Image.Image | np.ndarray, keep: np.ndarray | None = None) -> Tensor:
    """``[1, 3, H, W]`` float32 in [0, 1] as PIE builds it: ``img.astype(float32) / 255`` times ``keep``.

    ``keep`` is an ``[H, W]`` or ``[H, W, 3]`` array of 0/1 (PIE passes ``1 - mask3`` for the background).
    """
    arr = as_uint8(image).astype(np.float32) / 255
    if keep is not None:
        k = np.asarray(keep, dtype=np.float32)
        arr = arr * (k[..., None] if k.ndim == 2 else k)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]


def mse(x: Tensor, y: Tensor) -> float:
    """Mean squared error over every element (torchmetrics ``MeanSquaredError``), accumulated in float64."""
    if x.shape != y.shape:
        raise ValueError(f"MSE of tensors of different shapes {tuple(x.shape)} and {tuple(y.shape)}")
    return float(((x.double() - y.double()) ** 2).mean())


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> float:
    """``10 log10(data_range² / mse)`` over every element (torchmetrics ``PeakSignalNoiseRatio``); inf if equal."""
    err = mse(x, y)
    return math.inf if err == 0 else 10.0 * math.log10(data_range**2 / err)


def psnr_uint8(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """PSNR of two 8-bit images over all pixels and channels (peak 255); inf when identical."""
    x, y = as_uint8(a).astype(np.float64), as_uint8(b).astype(np.float64)
    if x.shape != y.shape:
        raise ValueError(f"PSNR of images of different shapes {x.shape} and {y.shape}")
    err = float(np.mean((x - y) ** 2))
    return math.inf if err == 0 else 10.0 * math.log10(255.0**2 / err)


def cap_psnr(value: float | None) -> float | None:
    """Clamp a PSNR at :data:`PSNR_CAP` (``None`` stays ``None``)."""
    return None if value is None else min(float(value), PSNR_CAP)


def gaussian_window(kernel_size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> Tensor:
    """The normalised 2-D Gaussian window of torchmetrics' SSIM: outer product of the 1-D kernel
    ``exp(-d² / 2σ²) / Σ`` at offsets ``d = -(k-1)/2 … (k-1)/2``. Shape ``[k, k]``."""
    d = torch.arange((1 - kernel_size) / 2, (1 + kernel_size) / 2, step=1, dtype=dtype)
    g = torch.exp(-((d / sigma) ** 2) / 2)
    g = g / g.sum()
    return g[:, None] @ g[None, :]


def ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 1.0,
    kernel_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Mean SSIM of two ``[N, C, H, W]`` batches as torchmetrics' ``StructuralSimilarityIndexMeasure``.

    Wang et al. (2004), eq. 13, with Gaussian-weighted local statistics::

        SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)),  C1 = (k1 L)², C2 = (k2 L)²

    computed in float64 at every position whose ``kernel_size`` window lies inside the image.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"SSIM needs two [N, C, H, W] tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    n, c, h, w = x.shape
    if h < kernel_size or w < kernel_size:
        raise ValueError(f"SSIM needs images of at least {kernel_size}x{kernel_size} pixels, got {w}x{h}")
    x, y = x.double(), y.double()
    window = gaussian_window(kernel_size, sigma).to(x.device).expand(c, 1, kernel_size, kernel_size)
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), window, groups=c)  # [5N, C, H-k+1, W-k+1]
    mu_x, mu_y, xx, yy, xy = stats.split(n)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    var_x = torch.clamp(xx - mu_x**2, min=0.0)
    var_y = torch.clamp(yy - mu_y**2, min=0.0)
    cov = xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.reshape(n, -1).mean(-1).mean())


def _check_pair(source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if source.shape != edited.shape:
        raise ValueError(f"source {source.shape} and edited {edited.shape} images differ in size")
    mask = np.asarray(mask).astype(bool)
    if mask.shape != source.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match the image size {source.shape[:2]}")
    return mask


def pie_background_metrics(
    source: Image.Image | np.ndarray, edited: Image.Image | np.ndarray, mask: np.ndarray
) -> dict[str, float | None]:
    """PIE-Bench's "unedit part" PSNR / MSE / SSIM, exactly as its evaluator (quirks included).

    Both images are scaled to [0, 1] and multiplied by ``1 - mask`` (tiled to 3 channels); the metrics run on
    these full frames, zeros included. ``mask`` is bool ``[H, W]``, True = edit region (decode it with the border
    rule). Returns ``{"psnr_bg", "mse_bg", "ssim_bg"}``, all ``None`` (PIE's "nan") when the mask covers every
    pixel. PSNR is not capped here (see :func:`cap_psnr`).
    """
    src, edt = as_uint8(source), as_uint8(edited)
    mask = _check_pair(src, edt, mask)
    keep = (~mask).astype(np.float32)
    if keep.sum() == 0:
        return {"psnr_bg": None, "mse_bg": None, "ssim_bg": None}
    x, y = to_unit_tensor(src, keep), to_unit_tensor(edt, keep)
    return {"psnr_bg": psnr(x, y), "mse_bg": mse(x, y), "ssim_bg": ssim(x, y)}


def background_only_metrics(
    source: Image.Image | np.ndarray, edited: Image.Image | np.ndarray, mask: np.ndarray
) -> dict[str, float | None]:
    """Corrected background PSNR and MSE: the squared error averaged over the background pixels only.

    ``mse = Σ_{bg} (x - y)² / (3 · #bg)`` on [0, 1] images, ``psnr = 10 log10(1 / mse)``. Related to PIE's by
    ``mse_pie = mse · #bg / (H · W)``. ``None`` when there is no background pixel.
    """
    src, edt = as_uint8(source), as_uint8(edited)
    mask = _check_pair(src, edt, mask)
    keep = ~mask
    count = int(keep.sum())
    if count == 0:
        return {"psnr_bg_corrected": None, "mse_bg_corrected": None}
    diff = (src.astype(np.float64) - edt.astype(np.float64)) / 255.0
    err = float((diff[keep] ** 2).sum() / (3 * count))
    return {
        "psnr_bg_corrected": math.inf if err == 0 else 10.0 * math.log10(1.0 / err),
        "mse_bg_corrected": err,
    }


def self_similarity(keys: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine self-similarity ``S = K Kᵀ / clamp(|k_i| |k_j|, eps)`` of token features ``[T, D]`` -> ``[T, T]``.

    The denominator is the outer product of the norms clamped at ``eps``, as in PIE's ``attn_cosine_sim``
    (taken from Splice's ViT extractor, Tumanyan et al. 2022).
    """
    if keys.ndim != 2:
        raise ValueError(f"expected token features [T, D], got {tuple(keys.shape)}")
    k = keys.double()
    norm = k.norm(dim=1, keepdim=True)  # [T, 1]
    return (k @ k.T) / torch.clamp(norm @ norm.T, min=eps)


def structure_distance_from_keys(keys_a: Tensor, keys_b: Tensor) -> float:
    """PIE's structure distance: ``mean((S_a - S_b)²)`` of the two keys self-similarity matrices."""
    if keys_a.shape != keys_b.shape:
        raise ValueError(f"key shapes differ: {tuple(keys_a.shape)} vs {tuple(keys_b.shape)}")
    return float(((self_similarity(keys_a) - self_similarity(keys_b)) ** 2).mean())


def finite_or_none(value: Any) -> float | None:
    """A float for JSON: NaN becomes ``None``, ±inf is kept for the caller to cap."""
    if value is None:
        return None
    v = float(value)
    return None if math.isnan(v) else v


def mean_of(values: list[float | None]) -> tuple[float | None, int]:
    """Mean of the non-``None`` values (PIE skips its "nan" rows) and how many there were."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return (float(np.mean(vals)) if vals else None), len(vals)


def describe(metrics: Mapping[str, Any]) -> str:
    """One-line rendering of a metrics dict for logs."""
    parts = []
    for k, v in metrics.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)
