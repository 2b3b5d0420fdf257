"""Per-image work of stage 1: decode, quality measures, hashes and the cheap embedding used by k-means.

Paper s4.1: "gradient-based filtering, image-entropy filtering, resolution filtering". The gradient and entropy
are computed on a grey copy resized so its short side is `analysis_size`, which makes them comparable across
resolutions. Resizing hides upscaling, so the upscaling detector (`native_scale`, the estimated enlargement factor)
is measured at the image's own scale, the scale training crops are taken at. Calibrated by
benchmarks/bench_sharpness.py (see FilterConfig.max_upscale and docs/curation-quality.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import imagehash
import numpy as np
from PIL import Image, ImageFilter

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
    native_scale: float = 1.0  # estimated enlargement factor (native_scale), 1.0 for a native image
    sharpness: float | None = None  # native_sharpness, computed only when filters.min_sharpness is on
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


# Native scale (the upscaling detector): the factor by which an image was enlarged from the source it was made from,
# 1.0 for a native image. Two measurements at the image's own scale, on its grey levels:
#  - smoothness scale. The structure function D(t) = mean (I(x + t) - I(x))^2 over horizontal and vertical pixel
#    pairs t apart (every SCALE_STRIDE-th row and column, at most SCALE_LINES of each, in the central SCALE_WINDOW
#    pixels) grows like t^2 where the image is smooth and more slowly where it has detail (natural images: about
#    t^1). An image enlarged by k from any source is an interpolation between samples k pixels apart, so it is
#    smooth below a scale proportional to k, whatever the kernel (bilinear, bicubic, Lanczos) and whether or not it
#    was JPEG-compressed afterwards (the quantisation error stays smooth within a block). The local exponent
#    a(t) = d log D / d log t is taken between successive lags of SCALE_LAGS at full resolution and, when the image
#    is still smooth at the last of them, of SCALE_COARSE_LAGS on a copy reduced SCALE_REDUCE x (box filter); the
#    scale is where a(t) falls below SCALE_SMOOTH (interpolated in log t, extrapolated below the first lag), times
#    SCALE_GAIN. The rounding of 8-bit values adds SCALE_NOISE to every D(t) and is subtracted first. The estimate is
#    monotone in the enlargement factor from 1.5x to 16x and close to it (benchmarks/bench_sharpness.py prints the
#    medians per factor and filter).
#  - pixel grid. Nearest-neighbour enlargement repeats rows and columns: the mean |horizontal difference| per column
#    is near zero except on the columns where a new source pixel starts (and likewise per row). Columns that exceed
#    both neighbours by GRID_PROMINENCE x and hold GRID_SHARE of the squared differences give the period (columns
#    per such column). In a JPEG file the columns across its 8 x 8 block edges count only where they are as strong as
#    the steps found elsewhere (so blocking is not taken for a grid), or where they hold GRID_JPEG_EDGES of
#    everything (constant blocks: a grid of 8 or 16 pixels). Steps look like detail to the structure function,
#    hence this second measurement.
#  - pixel-scale detail. Some native photos are soft over most of their area (cloud, rain, motion blur, shallow
#    focus) and their structure function above 2 px is that of a 3x enlargement; but their sensor noise and grain
#    are independent from pixel to pixel, which an enlargement by 3x or more cannot have (an interpolation is smooth
#    below its factor, and a JPEG encoder's error is smooth inside each 8 x 8 block). Where the local exponent
#    between lags 1 and 2 is below SCALE_DETAIL (over pixel pairs inside one block for a JPEG file, so that its
#    block edges are not taken for detail), the smoothness scale is capped at SCALE_DETAIL_CAP. The cap is below
#    the default max_upscale: such an image is kept, and ranks as at most a 2x enlargement.
# native_scale is the larger of the smoothness scale and the grid period, at most SCALE_MAX; below SCALE_NATIVE_BELOW it is 1.0 (the spread of sharp
# native photos). Constants chosen on benchmarks/bench_sharpness.py (44 dev photos, their downscales and JPEG
# re-encodes, their 1.5x-16x enlargements with four filters, with and without JPEG re-encoding).
SCALE_LAGS = (1, 2, 3, 4, 5, 6, 7)
SCALE_COARSE_LAGS = (1, 2, 3, 4, 6, 8)     # on the copy reduced SCALE_REDUCE x: 4 to 32 pixels
SCALE_REDUCE = 4
SCALE_STRIDE = 4
SCALE_LINES = 128                          # at most this many rows and columns are sampled
SCALE_WINDOW = 1024                        # larger images are measured on their central 1024 x 1024 pixels
SCALE_SMOOTH = 1.5                          # local exponent below which the image has detail at that scale
SCALE_GAIN = 0.91                           # makes the median estimate of 4x bilinear/bicubic/Lanczos enlargements 4.0
SCALE_NOISE = 2 * 1.45 / 12                 # D(t) of 8-bit rounding: RGB values and the grey conversion rounded
SCALE_MAX = 64.0
SCALE_NATIVE_BELOW = 1.25                   # estimates below this are reported as 1.0 (native)
SCALE_DETAIL = 1.76                         # exponent between lags 1 and 2 below which there is pixel-scale detail
SCALE_DETAIL_CAP = 2.0                      # the smoothness scale of an image with pixel-scale detail is at most this
GRID_PROMINENCE = 2.0
GRID_SHARE = 0.3
GRID_JPEG_EDGES = 0.9
JPEG_BLOCK = 8


def sampled_lines(grey: np.ndarray, stride: int, lines: int) -> tuple[np.ndarray, np.ndarray]:
    """(every `stride`-th row, every `stride`-th column as a row), as float32; at most `lines` of each when given
    (the stride grows for large images)."""
    h, w = grey.shape
    rows = grey[::max(stride, -(-h // lines) if lines else 1)].astype(np.float32)
    cols = np.ascontiguousarray(grey[:, ::max(stride, -(-w // lines) if lines else 1)].T, dtype=np.float32)
    return rows, cols


def structure_function(grey: np.ndarray, lags, stride: int = 1,
                       lines: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(D(t) for each lag, mean |horizontal difference| per column, mean |vertical difference| per row), over every
    `stride`-th row (for horizontal pairs) and column (for vertical pairs), and at most `lines` rows and columns when
    given (the stride grows for large images); the profiles come from the first lag."""
    rows, cols = sampled_lines(grey, stride, lines)
    out = np.empty(len(lags))
    col_prof = row_prof = np.zeros(0)
    for i, t in enumerate(lags):
        a = rows[:, t:] - rows[:, :-t]
        b = cols[:, t:] - cols[:, :-t]
        out[i] = 0.5 * (float(np.einsum("ij,ij->", a, a)) / max(1, a.size) +
                        float(np.einsum("ij,ij->", b, b)) / max(1, b.size))
        if i == 0:
            col_prof = np.abs(a).mean(axis=0)
            row_prof = np.abs(b).mean(axis=0)
    return out, col_prof, row_prof


def pixel_detail_exponent(grey: np.ndarray, d12: np.ndarray, stride: int, lines: int, jpeg: bool) -> float:
    """Local exponent of the structure function between lags 1 and 2 (8-bit rounding noise subtracted): about 2
    where the image is smooth at the pixel scale, lower where it has pixel-scale detail. `d12`: D(1), D(2) over all
    pairs (structure_function, same sampling); for a JPEG file (`jpeg`) they are taken again over the pairs inside one
    8 x 8 block (`grey` starts on the block grid), since the encoder's block edges are steps at the pixel scale."""
    if jpeg:
        rows, cols = sampled_lines(grey, stride, lines)
        d12 = np.empty(2)
        for i, t in enumerate((1, 2)):
            total = 0.0
            for m in (rows, cols):
                a = m[:, t:] - m[:, :-t]
                start = np.arange(a.shape[1])
                a = a[:, start // JPEG_BLOCK == (start + t) // JPEG_BLOCK]  # both pixels in one block
                total += 0.5 * float(np.einsum("ij,ij->", a, a)) / max(1, a.size)
            d12[i] = total
    d = np.maximum(np.asarray(d12[:2], dtype=np.float64) - SCALE_NOISE, 1e-9)
    return float(np.log2(d[1] / d[0]))


def smooth_scale(d: np.ndarray, lags, noise: float) -> float | None:
    """Lag where the local exponent of the structure function `d` falls below SCALE_SMOOTH (interpolated in log lag;
    below the first lag: extrapolated); None when the image is smooth over every lag given."""
    lags = np.asarray(lags, dtype=np.float64)
    d = np.maximum(np.asarray(d, dtype=np.float64) - noise, 1e-9)
    a = np.log(d[1:] / d[:-1]) / np.log(lags[1:] / lags[:-1])
    mid = np.sqrt(lags[1:] * lags[:-1])
    rough = np.flatnonzero(a < SCALE_SMOOTH)
    if rough.size == 0:
        return None
    i = int(rough[0])
    if i == 0:
        return float(mid[0] * 2.0 ** (a[0] - SCALE_SMOOTH))
    t = (a[i - 1] - SCALE_SMOOTH) / (a[i - 1] - a[i])
    return float(np.exp(np.log(mid[i - 1]) + t * (np.log(mid[i]) - np.log(mid[i - 1]))))


def grid_period(profile: np.ndarray, jpeg: bool = False) -> float:
    """Columns per source pixel of a nearest-neighbour enlargement, from the mean |difference| per column (or row);
    1.0 when there is no such grid."""
    d = np.asarray(profile, dtype=np.float64)
    if d.size < 3:
        return 1.0
    energy = d * d
    left, mid, right = d[:-2], d[1:-1], d[2:]
    peak = mid > GRID_PROMINENCE * np.maximum(left, right)
    keep = np.ones(d.size, bool)
    if jpeg:  # the difference at j spans pixels j and j + 1: across a block edge when j + 1 is a multiple of 8
        edge = np.zeros(d.size, bool)
        edge[JPEG_BLOCK - 1::JPEG_BLOCK] = True
        if float(energy[edge].sum()) < GRID_JPEG_EDGES * float(energy.sum()):
            inner = peak & ~edge[1:-1]
            # block edges count only where they are as strong as the steps found off them (blocking is weaker)
            strong = 0.5 * float(np.median(mid[inner])) if inner.any() else np.inf
            keep = ~edge | (d >= strong)
    peak &= keep[1:-1]
    total = float(energy[keep].sum())
    if total <= 0 or not peak.any() or float(energy[1:-1][peak].sum()) < GRID_SHARE * total:
        return 1.0
    return float(keep.sum()) / float(peak.sum())


def native_scale(img: Image.Image, jpeg: bool = False, palette: bool = False, stride: int = SCALE_STRIDE) -> float:
    """Estimated enlargement factor of an image (1.0: native; see SCALE_* above). `jpeg`: the pixels were decoded
    from a JPEG file (its block edges are then not mistaken for a nearest-neighbour grid). `palette`: they were
    stored with a palette (GIF, palette PNG), whose dithering is pixel-scale noise, not detail: the grey levels get a
    3 x 3 median first (measured: a palette copy then never scores below its original on the dev photos)."""
    w, h = img.size
    if max(w, h) > SCALE_WINDOW:  # the central window (its corner on the 8 x 8 JPEG grid) bounds the cost
        x0 = max(0, (w - SCALE_WINDOW) // 2) // JPEG_BLOCK * JPEG_BLOCK
        y0 = max(0, (h - SCALE_WINDOW) // 2) // JPEG_BLOCK * JPEG_BLOCK
        img = img.crop((x0, y0, min(w, x0 + SCALE_WINDOW), min(h, y0 + SCALE_WINDOW)))
    grey_img = img.convert("L")
    if palette:
        grey_img = grey_img.filter(ImageFilter.MedianFilter(3))
    grey = np.asarray(grey_img)  # uint8: only the sampled rows and columns are converted
    if min(grey.shape) <= SCALE_LAGS[-1] + 1:
        return 1.0
    d, cols, rows = structure_function(grey, SCALE_LAGS, stride, SCALE_LINES)
    t = smooth_scale(d, SCALE_LAGS, SCALE_NOISE)
    if t is None:  # smooth at every lag: look at the reduced copy for where the detail starts
        last = float(np.sqrt(SCALE_LAGS[-1] * SCALE_LAGS[-2]))
        small = grey_img.reduce(SCALE_REDUCE)
        t = SCALE_MAX / SCALE_GAIN
        if min(small.size) > SCALE_COARSE_LAGS[-1] + 1:
            d2, _, _ = structure_function(np.asarray(small), SCALE_COARSE_LAGS, 1, SCALE_LINES)
            t2 = smooth_scale(d2, SCALE_COARSE_LAGS, 2 / 12)  # the reduced copy is rounded to 8 bits again
            if t2 is not None:
                t = max(last, SCALE_REDUCE * t2)
    smooth = SCALE_GAIN * t
    if smooth > SCALE_DETAIL_CAP and pixel_detail_exponent(grey, d, stride, SCALE_LINES, jpeg) < SCALE_DETAIL:
        smooth = SCALE_DETAIL_CAP
    grid = float(np.sqrt(grid_period(cols, jpeg) * grid_period(rows, jpeg)))
    scale = max(smooth, grid)
    return 1.0 if scale < SCALE_NATIVE_BELOW else float(min(SCALE_MAX, scale))


# Native-scale sharpness (the earlier upscaling detector, now the opt-in filters.min_sharpness). A grid of SHARP_GRID x SHARP_GRID crops of SHARP_CROP px is taken at
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
SHARPNESS_OFF = -100.0                     # filters.min_sharpness at or below this: not computed


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
    scale = native_scale(img, jpeg=src.format == "jpeg", palette=src.palette)
    if filters.max_upscale and scale > filters.max_upscale:
        raise Rejected("upscaled", f"estimated enlargement {scale:.2f}x > {filters.max_upscale}")
    sharp = None
    if filters.min_sharpness > SHARPNESS_OFF:
        sharp = native_sharpness(img)
        if sharp < filters.min_sharpness:
            raise Rejected("low_sharpness", f"{sharp:.3f} < {filters.min_sharpness} (blurred or upscaled)")
    pix = hashlib.sha256(f"{w}x{h}:".encode())
    pix.update(img.tobytes())
    return Analysis(
        format=src.format, width=w, height=h, sha256=pix.hexdigest(),
        phash=hash_to_int64(imagehash.phash(img)), dhash=hash_to_int64(imagehash.dhash(img)),
        gradient=g_mean, entropy=ent, embedding=embedding(img, g_mean, g_std, ent), native_scale=scale,
        sharpness=sharp,
        fidelity=encoding_fidelity(src),
    )
