"""PSNR/SSIM on Y against an independent implementation (scikit-image) on real photos."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vosr.metrics import psnr_y, rgb_to_y, ssim_y

SCALE = 4
CROP = 192


def _skimage_y(a: np.ndarray) -> np.ndarray:
    # independent BT.601 luma from skimage's own YCbCr conversion (same 16-235 scale)
    from skimage.color import rgb2ycbcr

    return rgb2ycbcr(a)[..., 0]


def _pair(path) -> tuple[np.ndarray, np.ndarray]:
    """A centre crop of a photo and an x4 bicubic round trip of it with some noise (an imperfect 'SR')."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = min(CROP, w, h) // SCALE * SCALE
    left, top = (w - s) // 2, (h - s) // 2
    hr = img.crop((left, top, left + s, top + s))
    lr = hr.resize((s // SCALE, s // SCALE), Image.BICUBIC)
    sr = np.asarray(lr.resize((s, s), Image.BICUBIC)).astype(np.int16)
    rng = np.random.default_rng(len(path.name))
    sr = np.clip(sr + rng.integers(-3, 4, sr.shape), 0, 255).astype(np.uint8)
    return np.asarray(hr), sr


def test_luma_constants():
    assert rgb_to_y(np.zeros((1, 1, 3), np.uint8))[0, 0] == pytest.approx(16.0)
    assert rgb_to_y(np.full((1, 1, 3), 255, np.uint8))[0, 0] == pytest.approx(235.0)
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    assert rgb_to_y(red)[0, 0] == pytest.approx(16 + 65.481)


def test_psnr_ssim_y_match_skimage_on_dev_photos(photos):
    assert len(photos) >= 10
    for path in photos:
        hr, sr = _pair(path)
        ya = _skimage_y(hr)[SCALE:-SCALE, SCALE:-SCALE]
        yb = _skimage_y(sr)[SCALE:-SCALE, SCALE:-SCALE]
        ref_psnr = peak_signal_noise_ratio(ya, yb, data_range=255)
        ref_ssim = structural_similarity(ya, yb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=255)
        assert psnr_y(hr, sr, border=SCALE) == pytest.approx(ref_psnr, abs=1e-6), path.name
        assert ssim_y(hr, sr, border=SCALE) == pytest.approx(ref_ssim, abs=1e-6), path.name
        assert 15 < ref_psnr < 60 and 0.2 < ref_ssim < 1.0


def test_border_crop_changes_the_result_and_identity_is_perfect(photos):
    hr, sr = _pair(photos[0])
    assert psnr_y(hr, hr) == math.inf
    assert ssim_y(hr, hr) == pytest.approx(1.0)
    sr2 = sr.copy()
    sr2[:SCALE] = 0          # damage only the border rows: cropped away with border = scale
    assert psnr_y(hr, sr2, border=SCALE) == pytest.approx(psnr_y(hr, sr, border=SCALE))
    assert psnr_y(hr, sr2) < psnr_y(hr, sr) - 1.0


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError):
        psnr_y(np.zeros((20, 20, 3), np.uint8), np.zeros((20, 21, 3), np.uint8))
    with pytest.raises(ValueError):
        ssim_y(np.zeros((12, 12, 3), np.uint8), np.zeros((12, 12, 3), np.uint8), border=2)
