"""Colour correction of the SR output against the bicubic-upsampled LR (docs/method.md s8, "Post-processing").

- `adain` (default): per-channel global mean/std matching; std is the unbiased one, with eps 1e-5 added to the
  std (after the square root), as the authors' adain_color_fix does.
- `wavelet`: the reference calls it wavelet, but it is a Gaussian-blur low/high split (sigma = 5 px): the output
  keeps its own high frequencies and takes the low frequencies of the LR. The option keeps the reference's name;
  the function is named for what it does (`gaussian_lowpass_swap`).
- `none`: unchanged.
All functions take and return float tensors [B, 3, H, W] in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ADAIN_EPS = 1e-5          # docs/method.md s8
LOWPASS_SIGMA = 5.0       # docs/method.md s8: the "wavelet" fix is a sigma = 5 px Gaussian blur


def _mean_std(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.std(dim=2, unbiased=True) + eps)[..., None, None]   # eps on the std (docs/method.md s8)
    return mean, std


def adain(x: torch.Tensor, ref: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """Match each channel's mean and std of `x` to those of `ref` (sizes may differ)."""
    mx, sx = _mean_std(x.double(), eps)
    mr, sr = _mean_std(ref.double(), eps)
    return ((x.double() - mx) / sx * sr + mr).to(x.dtype)


def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    radius = max(int(math.ceil(3 * sigma)), 1)
    i = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(i ** 2) / (2 * sigma ** 2))
    return (k / k.sum()).to(dtype)


def gaussian_blur(x: torch.Tensor, sigma: float = LOWPASS_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders (replicated where the image is too small to reflect)."""
    k = gaussian_kernel1d(sigma, x.dtype).to(x.device)
    r = k.numel() // 2
    c = x.shape[1]
    h, w = x.shape[-2:]
    mode = "reflect" if min(h, w) > r else "replicate"
    y = F.pad(x, (r, r, r, r), mode=mode)
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y


def gaussian_lowpass_swap(x: torch.Tensor, ref: torch.Tensor, sigma: float = LOWPASS_SIGMA) -> torch.Tensor:
    """x - blur(x) + blur(ref): the reference's "wavelet" colour fix (ref resized to x's size by the caller)."""
    if x.shape != ref.shape:
        raise ValueError(f"lowpass swap needs equal shapes, got {tuple(x.shape)} and {tuple(ref.shape)}")
    xd, rd = x.double(), ref.double()
    return (xd - gaussian_blur(xd, sigma) + gaussian_blur(rd, sigma)).to(x.dtype)


COLOR_FIXES = {
    "adain": adain,
    "wavelet": gaussian_lowpass_swap,
    "none": lambda x, ref: x,
}


def color_fix(x: torch.Tensor, ref: torch.Tensor, method: str = "adain") -> torch.Tensor:
    """Apply the named colour fix and clamp to [0, 1]."""
    if method not in COLOR_FIXES:
        raise ValueError(f"unknown colour fix {method!r}; known: {', '.join(COLOR_FIXES)}")
    return COLOR_FIXES[method](x, ref).clamp(0, 1)
