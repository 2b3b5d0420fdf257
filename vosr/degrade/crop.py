"""Training crops (METHOD.md s1 RandomCropTransform): upscale a short side below `resolution` with PIL bicubic so
it equals `resolution`, then one uniform random `resolution x resolution` crop drawn from the sample's seed."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def upscale_short_side(img: Image.Image, resolution: int) -> Image.Image:
    w, h = img.size
    short = min(w, h)
    if short >= resolution:
        return img
    s = resolution / short
    size = (max(resolution, math.ceil(w * s - 1e-9)), max(resolution, math.ceil(h * s - 1e-9)))
    if w <= h:
        size = (resolution, size[1])
    else:
        size = (size[0], resolution)
    return img.resize(size, Image.BICUBIC)


def random_crop(img: Image.Image, resolution: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """-> (uint8 [resolution, resolution, 3] RGB crop, [left, top, width, height] box in the (upscaled) image)."""
    img = upscale_short_side(img.convert("RGB"), resolution)
    w, h = img.size
    g = torch.Generator().manual_seed(int(seed))
    left = int(torch.randint(0, w - resolution + 1, (1,), generator=g).item())
    top = int(torch.randint(0, h - resolution + 1, (1,), generator=g).item())
    arr = np.array(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    return np.ascontiguousarray(arr), [left, top, resolution, resolution]
