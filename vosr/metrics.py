"""Full-reference fidelity metrics of the SR literature: PSNR and SSIM on the Y channel.

Convention (BasicSR / the SR papers the VOSR tables follow): convert RGB in [0, 1] to YCbCr BT.601 luma
Y = 16 + 65.481 R + 128.553 G + 24.966 B (on the 0-255 scale, not rounded), crop `border` pixels on every
side (border = the scale factor), then
- PSNR = 10 log10(255^2 / MSE);
- SSIM with an 11x11 Gaussian window (sigma 1.5), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, population
  statistics, averaged over the positions where the window lies fully inside the image.
Inputs are uint8 arrays [H, W, 3], PIL images, or float arrays in [0, 255].
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5            # 11x11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0


def _as_array(img: Any) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    return arr.astype(np.float64)


def rgb_to_y(img: Any) -> np.ndarray:
    """BT.601 luma on the 0-255 scale from RGB on the 0-255 scale (float64, not rounded)."""
    arr = _as_array(img) / 255.0
    return 16.0 + 65.481 * arr[..., 0] + 128.553 * arr[..., 1] + 24.966 * arr[..., 2]


def _crop(y: np.ndarray, border: int) -> np.ndarray:
    if border <= 0:
        return y
    if y.shape[0] <= 2 * border or y.shape[1] <= 2 * border:
        raise ValueError(f"image {y.shape} is too small for a border crop of {border}")
    return y[border:-border, border:-border]


def _pair(a: Any, b: Any, border: int) -> tuple[np.ndarray, np.ndarray]:
    ya, yb = rgb_to_y(a), rgb_to_y(b)
    if ya.shape != yb.shape:
        raise ValueError(f"images differ in size: {ya.shape} vs {yb.shape}")
    return _crop(ya, border), _crop(yb, border)


def psnr_y(a: Any, b: Any, border: int = 0) -> float:
    """PSNR in dB on Y; inf for identical images."""
    ya, yb = _pair(a, b, border)
    mse = float(np.mean((ya - yb) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(DATA_RANGE ** 2 / mse)


def _gauss_window() -> np.ndarray:
    i = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    k = np.exp(-(i ** 2) / (2 * SSIM_SIGMA ** 2))
    return k / k.sum()


def _filter_valid(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable correlation keeping only positions where the window lies inside the image."""
    n = k.size
    h, w = x.shape
    rows = sum(k[j] * x[:, j:w - n + 1 + j] for j in range(n))
    return sum(k[j] * rows[j:h - n + 1 + j, :] for j in range(n))


def ssim_y(a: Any, b: Any, border: int = 0) -> float:
    """Mean SSIM on Y over the valid window positions."""
    ya, yb = _pair(a, b, border)
    if min(ya.shape) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"image {ya.shape} (after the border crop) is smaller than the 11x11 SSIM window")
    x, y = ya, yb
    k = _gauss_window()
    mx, my = _filter_valid(x, k), _filter_valid(y, k)
    sxx = _filter_valid(x * x, k) - mx * mx
    syy = _filter_valid(y * y, k) - my * my
    sxy = _filter_valid(x * y, k) - mx * my
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())
