"""Image operations of the degradation, on one image [1, C, H, W] in [0, 1] (CPU or GPU tensors).

Per-image randomness (docs/method.md s0) gives every image its own sizes, so the pipeline runs these per image.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def _trim(kernel: torch.Tensor) -> torch.Tensor:
    """Drop the all-zero border of a zero-padded kernel. Exact: the reflected samples those zeros would weight are
    never used, so blurring with the trimmed kernel and its smaller reflect padding gives the same result."""
    nz = kernel.abs() > 0
    rows = torch.nonzero(nz.any(1)).flatten()
    cols = torch.nonzero(nz.any(0)).flatten()
    r = int(max(kernel.shape[0] // 2 - rows.min(), rows.max() - kernel.shape[0] // 2,
                kernel.shape[1] // 2 - cols.min(), cols.max() - kernel.shape[1] // 2))
    c0, c1 = kernel.shape[0] // 2, kernel.shape[1] // 2
    return kernel[c0 - r:c0 + r + 1, c1 - r:c1 + r + 1]


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Blur [1, C, H, W] with a 2D kernel (correlation, as conv2d), reflect padding (Real-ESRGAN filter2D).

    CPU tensors go through OpenCV (cv2.filter2D switches to a DFT for large kernels: several times faster than a
    direct 21x21 conv on one core); other devices use torch conv2d. Both use reflect-101 borders (torch "reflect").
    Images smaller than the kernel radius (only at tiny debug resolutions) fall back to replicate padding,
    because reflect padding needs the pad to be smaller than the image.
    """
    k = _trim(kernel)
    if k.shape[0] == 1:
        return img * float(k[0, 0])
    p = k.shape[0] // 2
    _, c, h, w = img.shape
    reflect = p < h and p < w
    if img.device.type == "cpu":
        x = img[0].permute(1, 2, 0).contiguous().numpy()
        border = cv2.BORDER_REFLECT_101 if reflect else cv2.BORDER_REPLICATE
        out = cv2.filter2D(x, -1, k.numpy().astype(np.float32), borderType=border)
        if out.ndim == 2:
            out = out[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)[None].to(img.dtype)
    kk = k.to(img.dtype).to(img.device)
    x = F.pad(img, (p, p, p, p), mode="reflect" if reflect else "replicate")
    x = x.reshape(c, 1, h + 2 * p, w + 2 * p)
    return F.conv2d(x, kk[None, None]).reshape(1, c, h, w)


def resize(img: torch.Tensor, mode: str, size: tuple[int, int] | None = None,
           scale: float | None = None) -> torch.Tensor:
    """F.interpolate as the reference calls it (no antialias, align_corners left at its default)."""
    if size is not None:
        size = (max(1, int(size[0])), max(1, int(size[1])))
        return F.interpolate(img, size=size, mode=mode)
    h, w = img.shape[-2:]
    if int(h * scale) < 1 or int(w * scale) < 1:
        return F.interpolate(img, size=(max(1, int(h * scale)), max(1, int(w * scale))), mode=mode)
    return F.interpolate(img, scale_factor=scale, mode=mode)


def to_gray(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img[:, 0:1], img[:, 1:2], img[:, 2:3]
    return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b


def gaussian_noise(img: torch.Tensor, sigma: float, gray: bool, g: torch.Generator) -> torch.Tensor:
    """Add N(0, sigma^2) noise (sigma in [0,1] units), grey (one map for all channels) or colour; clip to [0, 1]."""
    _, c, h, w = img.shape
    shape = (1, 1, h, w) if gray else (1, c, h, w)
    noise = torch.randn(shape, generator=g, dtype=torch.float32).to(img.device, img.dtype) * sigma
    return (img + noise).clamp(0, 1)


def _poisson_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # Real-ESRGAN: quantise to 8 bits, count distinct levels, round up to a power of two, sample Poisson.
    q = (x * 255.0).round().clamp(0, 255)
    x = q / 255.0
    distinct = int((torch.bincount(q.flatten().to(torch.int64), minlength=256) > 0).sum())  # == unique(x).numel()
    levels = 2 ** math.ceil(math.log2(max(distinct, 1)))
    lam = (x * levels).to("cpu", torch.float32)
    out = torch.poisson(lam, generator=g).to(x.device, x.dtype) / levels
    return out - x


def poisson_noise(img: torch.Tensor, scale: float, gray: bool, g: torch.Generator) -> torch.Tensor:
    """Add scaled Poisson (shot) noise computed from the 8-bit image, grey or colour; clip to [0, 1]."""
    noise = _poisson_noise(to_gray(img), g) if gray else _poisson_noise(img, g)
    return (img + noise * scale).clamp(0, 1)


def jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Real JPEG round trip through libjpeg (OpenCV), on 8-bit RGB, 4:2:0 chroma subsampling.

    The reference uses DiffJPEG (a differentiable float approximation); real JPEG is exact, deterministic and gives
    real codec artefacts, but quantises the image to 8 bits at each JPEG step and takes an integer quality.
    """
    x = img[0].clamp(0, 1).mul(255).round().to("cpu", torch.uint8).permute(1, 2, 0).numpy()
    bgr = np.ascontiguousarray(x[:, :, ::-1])
    ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    out = torch.from_numpy(np.ascontiguousarray(dec)).permute(2, 0, 1)[None]
    return out.to(img.device, img.dtype) / 255.0


def quantize8(img: torch.Tensor) -> torch.Tensor:
    """docs/method.md s1 step 6: clamp(round(x * 255), 0, 255) / 255."""
    return (img * 255.0).round().clamp(0, 255) / 255.0
