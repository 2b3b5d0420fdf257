"""Per-image work of stage 1: decode, quality measures, hashes and the cheap embedding used by k-means.

Paper s4.1: "gradient-based filtering, image-entropy filtering, resolution filtering". The measures are computed
on a grey copy resized so its short side is `analysis_size`, which makes them comparable across resolutions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

from vosr.imageio import ImageDecodeError, decode_image

EMBED_THUMB = 8  # 8x8 RGB thumbnail
EMBED_DIM = EMBED_THUMB * EMBED_THUMB * 3 + 4  # + gradient mean/std, entropy, log aspect


@dataclass
class Analysis:
    """What stage 1 records about one decoded image."""

    format: str
    width: int
    height: int
    sha256: str       # of the decoded RGB pixels (exact dedup)
    phash: int        # 64-bit pHash as signed int64
    dhash: int        # 64-bit dHash as signed int64
    gradient: float   # mean gradient magnitude (0-255 scale) at the analysis size
    entropy: float    # grey-level entropy in bits (0..8)
    embedding: np.ndarray  # float32 [EMBED_DIM]


class Rejected(Exception):
    """An image that decoded but failed a filter, or failed to decode; `reason` is the counted code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def hash_to_int64(h: imagehash.ImageHash) -> int:
    bits = np.asarray(h.hash, dtype=bool).reshape(-1)
    if bits.size != 64:
        raise ValueError(f"expected a 64-bit hash, got {bits.size} bits")
    value = 0
    for b in bits:
        value = (value << 1) | int(b)
    return value - (1 << 64) if value >= (1 << 63) else value


def grey_at(img: Image.Image, size: int) -> np.ndarray:
    """Luma (0-255 float32) resized so the short side is `size` (never upscaled)."""
    w, h = img.size
    scale = size / min(w, h)
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR,
                         reducing_gap=2.0)
    return np.asarray(img.convert("L"), dtype=np.float32)


def gradient_score(grey: np.ndarray) -> tuple[float, float]:
    """(mean, std) of the central-difference gradient magnitude on the 0-255 scale."""
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0, 0.0
    gx = (grey[1:-1, 2:] - grey[1:-1, :-2]) * 0.5
    gy = (grey[2:, 1:-1] - grey[:-2, 1:-1]) * 0.5
    mag = np.sqrt(gx * gx + gy * gy)
    return float(mag.mean()), float(mag.std())


def grey_entropy(grey: np.ndarray) -> float:
    """Shannon entropy (bits) of the 256-bin grey-level histogram."""
    hist = np.bincount(np.clip(grey + 0.5, 0, 255).astype(np.uint8).reshape(-1), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


def embedding(img: Image.Image, grad_mean: float, grad_std: float, entropy: float) -> np.ndarray:
    """Cheap content embedding for k-means balancing: 8x8 colour thumbnail + gradient/entropy stats."""
    thumb = np.asarray(img.resize((EMBED_THUMB, EMBED_THUMB), Image.Resampling.BOX), dtype=np.float32) / 255.0
    w, h = img.size
    stats = np.array([grad_mean / 64.0, grad_std / 64.0, entropy / 8.0, np.log(w / h)], dtype=np.float32)
    return np.concatenate([thumb.reshape(-1), stats]).astype(np.float32)


def analyse(data: bytes, filters) -> Analysis:
    """Decode and measure one image; raise Rejected(reason) when decoding or a filter (config `filters`) fails."""
    try:
        img, fmt = decode_image(data, filters.max_pixels, with_format=True)
    except ImageDecodeError as exc:
        raise Rejected(exc.reason, exc.detail) from exc
    w, h = img.size
    if min(w, h) < filters.min_short_side:
        raise Rejected("too_small", f"{w}x{h}, short side < {filters.min_short_side}")
    if max(w, h) / min(w, h) > filters.max_aspect_ratio:
        raise Rejected("bad_aspect", f"{w}x{h}, aspect > {filters.max_aspect_ratio}")
    grey = grey_at(img, filters.analysis_size)
    g_mean, g_std = gradient_score(grey)
    ent = grey_entropy(grey)
    if g_mean < filters.min_gradient:
        raise Rejected("low_gradient", f"{g_mean:.3f} < {filters.min_gradient}")
    if ent < filters.min_entropy:
        raise Rejected("low_entropy", f"{ent:.3f} < {filters.min_entropy}")
    pix = hashlib.sha256(f"{w}x{h}:".encode())
    pix.update(img.tobytes())
    return Analysis(
        format=fmt, width=w, height=h, sha256=pix.hexdigest(),
        phash=hash_to_int64(imagehash.phash(img)), dhash=hash_to_int64(imagehash.dhash(img)),
        gradient=g_mean, entropy=ent, embedding=embedding(img, g_mean, g_std, ent),
    )
