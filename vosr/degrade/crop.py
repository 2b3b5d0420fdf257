"""Training crops (docs/method.md s1 RandomCropTransform): upscale a short side below `resolution` with PIL bicubic so
it equals `resolution`, then one uniform random `resolution x resolution` crop drawn from the sample's seed."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def upscaled_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) after the short-side upscale (unchanged when the short side is already >= resolution)."""
    w, h = size
    short = min(w, h)
    if short >= resolution:
        return w, h
    s = resolution / short
    if w <= h:
        return resolution, max(resolution, math.ceil(h * s - 1e-9))
    return max(resolution, math.ceil(w * s - 1e-9)), resolution


def upscale_short_side(img: Image.Image, resolution: int) -> Image.Image:
    size = upscaled_size(img.size, resolution)
    return img if size == img.size else img.resize(size, Image.BICUBIC)


def random_crop(img: Image.Image, resolution: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """-> (uint8 [resolution, resolution, 3] RGB crop, [left, top, width, height] box in the (upscaled) image)."""
    img = upscale_short_side(img.convert("RGB"), resolution)
    w, h = img.size
    g = torch.Generator().manual_seed(int(seed))
    left = int(torch.randint(0, w - resolution + 1, (1,), generator=g).item())
    top = int(torch.randint(0, h - resolution + 1, (1,), generator=g).item())
    arr = np.array(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    return np.ascontiguousarray(arr), [left, top, resolution, resolution]
