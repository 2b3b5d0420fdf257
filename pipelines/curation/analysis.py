"""Per-image work of stage 1: decode, quality measures, hashes and the cheap embedding used by k-means.

Paper s4.1: "gradient-based filtering, image-entropy filtering, resolution filtering". The gradient and entropy
are computed on a grey copy resized so its short side is `analysis_size`, which makes them comparable across
resolutions. Resizing hides upscaling, so the sharpness score (`native_sharpness`) is measured at the image's own
scale, the scale training crops are taken at: an image enlarged from a smaller one has almost no energy in the top
of its spectrum. Calibrated by benchmarks/bench_sharpness.py (see FilterConfig.min_sharpness).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import imagehash
import numpy as np
from PIL import Image

from vosr.imageio import ImageDecodeError, SourceInfo, decode_with_source

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
    sharpness: float = 0.0  # native_sharpness: log10 top-band / mid-band power at native scale
    fidelity: float = 100.0  # encoding_fidelity: 100 lossless true colour, else lower (see there)


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


# Native-scale sharpness (upscaling detector). A grid of SHARP_GRID x SHARP_GRID crops of SHARP_CROP px is taken at
# the image's own resolution; each crop's grey levels get a Hann window and a 2-D FFT, and the radial power spectrum
# (frequency as a fraction of Nyquist) is averaged in third-octave bins from 1/16 to 1. A crop's score is the mean
# log10 power of the bins in HIGH (0.63-1.0 of Nyquist, where an image enlarged by 1.5x or more holds only
# interpolation leakage) minus that of the bins in MID (0.125-0.315, real content even after a 4x enlargement): the
# spectral fall-off over the top of the band. The image's score is the mean over the SHARP_TOP crops with the most
# MID energy (flat sky says nothing about sharpness). Bands, crop count and the default threshold were chosen on
# benchmarks/bench_sharpness.py (44 real photos, their JPEG q85-95 re-encodes, their 1.5-4x bicubic/Lanczos
# upscales).
SHARP_CROP = 128
SHARP_GRID = 4
SHARP_TOP = 4
SHARP_BINS_PER_OCTAVE = 3
SHARP_LOWEST = 1 / 16                      # lower edge of the first bin (fraction of Nyquist); 12 bins up to 1.0
SHARP_HIGH_BINS = (10, 12)                 # 0.63 - 1.0 of Nyquist
SHARP_MID_BINS = (3, 7)                    # 0.125 - 0.315 of Nyquist


@lru_cache(maxsize=8)
def _spectrum_bins(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(flat indices of the rfft2 samples inside the bins, their bin numbers, samples per bin, Hann window)."""
    fy = np.fft.fftfreq(n) * 2.0
    fx = np.fft.rfftfreq(n) * 2.0
    r = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).reshape(-1)
    nbins = int(round(np.log2(1 / SHARP_LOWEST) * SHARP_BINS_PER_OCTAVE))
    edges = SHARP_LOWEST * 2.0 ** (np.arange(nbins + 1) / SHARP_BINS_PER_OCTAVE)
    b = np.digitize(r, edges) - 1
    inside = np.flatnonzero((b >= 0) & (b < nbins))
    counts = np.maximum(np.bincount(b[inside], minlength=nbins), 1).astype(np.float64)
    return inside, b[inside], counts, np.outer(np.hanning(n), np.hanning(n)).astype(np.float32)


def native_sharpness(img: Image.Image, crop: int = SHARP_CROP) -> float:
    """Upscaling-sensitive sharpness of an image at its own scale (higher = sharper; see SHARP_* above)."""
    w, h = img.size
    n = min(crop, w, h) // 2 * 2
    if n < 16:
        return float("-inf")
    inside, bins, counts, win = _spectrum_bins(n)
    nbins = counts.size
    scores, texture = [], []
    for y in np.linspace(0, h - n, SHARP_GRID).astype(int):
        for x in np.linspace(0, w - n, SHARP_GRID).astype(int):
            g = np.asarray(img.crop((int(x), int(y), int(x) + n, int(y) + n)).convert("L"), dtype=np.float32)
            p = np.abs(np.fft.rfft2((g - g.mean()) * win)).reshape(-1) ** 2
            level = np.log10(np.bincount(bins, weights=p[inside], minlength=nbins) / counts + 1e-6)
            mid = level[SHARP_MID_BINS[0]:SHARP_MID_BINS[1]].mean()
            scores.append(level[SHARP_HIGH_BINS[0]:SHARP_HIGH_BINS[1]].mean() - mid)
            texture.append(level[SHARP_MID_BINS[0] + 1:SHARP_MID_BINS[1]].mean())
    top = np.argsort(np.asarray(texture), kind="stable")[-SHARP_TOP:]
    return float(np.mean(np.asarray(scores)[top]))


# Encoding fidelity (duplicate representative choice, pipelines/curate_schema.py): how close the stored pixels are
# to a lossless true-colour original, 0-100. Lossless true colour 100; JPEG its estimated libjpeg quality capped at
# 99; lossy WebP and lossy-compressed TIFF a nominal 50, below JPEGs of ordinary quality (their quantiser is not
# read, and the web's lossy WebPs are mostly CDN conversions of JPEG originals); CMYK storage at most 50 (a
# colour-space conversion of unknown accuracy); palette or bilevel storage (palette PNG, GIF) at most 40 (colours
# reduced to 256 or fewer).
FIDELITY_LOSSLESS = 100.0
FIDELITY_LOSSY_NOMINAL = 50.0
FIDELITY_CMYK_CAP = 50.0
FIDELITY_PALETTE_CAP = 40.0


def encoding_fidelity(src: SourceInfo) -> float:
    if src.jpeg_quality is not None:
        value = float(min(max(src.jpeg_quality, 1), 99))
    else:
        value = FIDELITY_LOSSLESS if src.lossless else FIDELITY_LOSSY_NOMINAL
    if src.cmyk:
        value = min(value, FIDELITY_CMYK_CAP)
    if src.palette:
        value = min(value, FIDELITY_PALETTE_CAP)
    return value


def embedding(img: Image.Image, grad_mean: float, grad_std: float, entropy: float) -> np.ndarray:
    """Cheap content embedding for k-means balancing: 8x8 colour thumbnail + gradient/entropy stats."""
    thumb = np.asarray(img.resize((EMBED_THUMB, EMBED_THUMB), Image.Resampling.BOX), dtype=np.float32) / 255.0
    w, h = img.size
    stats = np.array([grad_mean / 64.0, grad_std / 64.0, entropy / 8.0, np.log(w / h)], dtype=np.float32)
    return np.concatenate([thumb.reshape(-1), stats]).astype(np.float32)


def analyse(data: bytes, filters) -> Analysis:
    """Decode and measure one image; raise Rejected(reason) when decoding or a filter (config `filters`) fails."""
    try:
        img, src = decode_with_source(data, filters.max_pixels)
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
    sharp = native_sharpness(img)
    if sharp < filters.min_sharpness:
        raise Rejected("low_sharpness", f"{sharp:.3f} < {filters.min_sharpness} (blurred or upscaled)")
    pix = hashlib.sha256(f"{w}x{h}:".encode())
    pix.update(img.tobytes())
    return Analysis(
        format=src.format, width=w, height=h, sha256=pix.hexdigest(),
        phash=hash_to_int64(imagehash.phash(img)), dhash=hash_to_int64(imagehash.dhash(img)),
        gradient=g_mean, entropy=ent, embedding=embedding(img, g_mean, g_std, ent), sharpness=sharp,
        fidelity=encoding_fidelity(src),
    )
