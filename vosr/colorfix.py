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


BAND_ROWS = 256   # rows per band of the in-place colour fix


def _band_mean_std(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """_mean_std of one image [1, C, H, W] accumulated in float64 band by band (no full float64 copy)."""
    n = x.shape[-2] * x.shape[-1]
    s = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for a in range(0, x.shape[-2], BAND_ROWS):
        s += x[0, :, a:a + BAND_ROWS].double().sum(dim=(1, 2))
    mean = s / n
    ss = torch.zeros_like(s)
    for a in range(0, x.shape[-2], BAND_ROWS):
        ss += ((x[0, :, a:a + BAND_ROWS].double() - mean[:, None, None]) ** 2).sum(dim=(1, 2))
    std = (ss / max(n - 1, 1) + eps).sqrt()
    return mean[None, :, None, None], std[None, :, None, None]


def color_fix_inplace(x: torch.Tensor, ref: torch.Tensor, method: str = "adain") -> torch.Tensor:
    """color_fix of one large image [1, 3, H, W] written into `x`, a band of rows at a time, so that no full-size
    float64 copy exists (the result equals color_fix's up to float64 summation order). `ref` has x's shape."""
    if method not in COLOR_FIXES:
        raise ValueError(f"unknown colour fix {method!r}; known: {', '.join(COLOR_FIXES)}")
    if method == "adain":
        mx, sx = _band_mean_std(x, ADAIN_EPS)
        mr, sr = _band_mean_std(ref, ADAIN_EPS)
        for a in range(0, x.shape[-2], BAND_ROWS):
            band = x[:, :, a:a + BAND_ROWS]
            band.copy_(((band.double() - mx) / sx * sr + mr).to(x.dtype).clamp_(0, 1))
    elif method == "wavelet":
        if x.shape != ref.shape:
            raise ValueError(f"lowpass swap needs equal shapes, got {tuple(x.shape)} and {tuple(ref.shape)}")
        r = gaussian_kernel1d(LOWPASS_SIGMA).numel() // 2
        h = x.shape[-2]
        if min(h, x.shape[-1]) <= BAND_ROWS + 2 * r:      # too thin for bands: the plain function
            x.copy_(color_fix(x, ref, method))
            return x
        # each band is blurred with r rows of context either side (exact inside: the kernel reaches r rows);
        # results go to a side buffer, since later bands read rows of x that earlier bands would change
        out = torch.empty_like(x)
        for a in range(0, h, BAND_ROWS):
            lo, hi = max(0, a - r), min(h, a + BAND_ROWS + r)
            fixed = _lowpass_band(x[:, :, lo:hi], ref[:, :, lo:hi], lo, hi, h, r)
            out[:, :, a:a + BAND_ROWS] = fixed[:, :, a - lo:a - lo + BAND_ROWS]
        x.copy_(out.clamp_(0, 1))
    else:
        x.clamp_(0, 1)
    return x


def _lowpass_band(x: torch.Tensor, ref: torch.Tensor, lo: int, hi: int, h: int, r: int) -> torch.Tensor:
    """gaussian_lowpass_swap on rows [lo, hi) of an image of h rows, valid on the rows at least r away from a cut
    that is not the image border: the band is reflect-padded vertically only where it touches the border."""
    def blur(t: torch.Tensor) -> torch.Tensor:
        k = gaussian_kernel1d(LOWPASS_SIGMA, t.dtype).to(t.device)
        c = t.shape[1]
        top = r if lo == 0 else 0
        bottom = r if hi == h else 0
        y = F.pad(t, (r, r, top, bottom), mode="reflect")
        y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        pad_top = 0 if lo == 0 else r      # rows lost at a cut: filler that keeps row i at lo + i (never used)
        pad_bottom = 0 if hi == h else r
        return F.pad(y, (0, 0, pad_top, pad_bottom), mode="replicate")

    xd, rd = x.double(), ref.double()
    return (xd - blur(xd) + blur(rd)).to(x.dtype)
