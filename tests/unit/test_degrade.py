"""Degradation (docs/method.md s1): kernels, sampled-parameter distributions, determinism, quantisation, crops."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from jobkit.config import ConfigError, config_from_dict
from vosr.degrade import degrade, get_preset, random_crop
from vosr.degrade.kernels import build_kernel, sample_kernel
from vosr.degrade.realesrgan import sample_params
from vosr.seeding import sample_seed

N = 4000  # parameter draws for the distribution tests (cheap: no image work)
ALPHA = 1e-4  # fixed seeds make these deterministic; a correct sampler passes at this level with margin


@pytest.fixture(scope="module")
def dcfg():
    return config_from_dict({}).degrade


@pytest.fixture(scope="module")
def draws(dcfg):
    return [sample_params(torch.Generator().manual_seed(sample_seed(7, f"img{i}", 0)), dcfg.realesrgan)
            for i in range(N)]


def _binom_ok(k: int, n: int, p: float) -> None:
    assert stats.binomtest(k, n, p).pvalue > ALPHA, f"{k}/{n} is not consistent with p={p}"


def _chisq_ok(counts: dict, probs: dict) -> None:
    n = sum(counts.values())
    keys = sorted(probs)
    assert set(counts) <= set(keys), f"unexpected categories {set(counts) - set(keys)}"
    obs = [counts.get(k, 0) for k in keys]
    exp = [probs[k] * n for k in keys]
    assert stats.chisquare(obs, exp).pvalue > ALPHA, f"observed {dict(zip(keys, obs))} vs expected {probs}"


def _uniform_ok(values: list[float], lo: float, hi: float) -> None:
    v = np.asarray(values)
    assert v.min() >= lo and v.max() <= hi, (v.min(), v.max(), lo, hi)
    assert stats.kstest(v, "uniform", args=(lo, hi - lo)).pvalue > ALPHA


def test_kernels_sum_to_one_sizes_and_symmetry(dcfg):
    rc = dcfg.realesrgan
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(300):
        p = sample_kernel(g, rc.kernel_sizes, rc.kernel_families, rc.kernel_probs, rc.sinc_prob, rc.blur_sigma,
                          rc.betag_range, rc.betap_range)
        k = build_kernel(p, rc.kernel_pad_to)
        seen.add(p["family"])
        assert k.shape == (21, 21)
        assert abs(float(k.sum()) - 1.0) < 1e-9
        # support is exactly the drawn size, centred, zero outside
        pad = (21 - p["size"]) // 2
        inner = k[pad:21 - pad, pad:21 - pad]
        assert inner.shape == (p["size"], p["size"])
        outside = k.clone()
        outside[pad:21 - pad, pad:21 - pad] = 0
        assert float(outside.abs().sum()) == 0.0
        if p["family"] in ("iso", "generalized_iso", "plateau_iso", "sinc"):
            assert torch.allclose(k, k.T, atol=1e-12)
            assert torch.allclose(k, k.flip(0), atol=1e-12)
            assert torch.allclose(k, k.flip(1), atol=1e-12)
        if p["family"] == "aniso":
            assert torch.allclose(k, k.flip(0).flip(1), atol=1e-12)  # point-symmetric Gaussian
    assert {"iso", "aniso", "sinc", "generalized_iso", "plateau_iso"} <= seen


def test_anisotropic_kernel_is_not_isotropic():
    k = build_kernel({"family": "aniso", "size": 21, "sigma_x": 3.0, "sigma_y": 0.5, "theta": 0.0}, 21)
    assert not torch.allclose(k, k.T, atol=1e-4)
    assert float(k[10, 10 + 3]) > float(k[10 + 3, 10])  # wider along x (columns)


def test_k1_distribution(draws):
    k1 = [d["k1"] for d in draws]
    _binom_ok(sum(k["family"] == "sinc" for k in k1), N, 0.1)
    _chisq_ok(Counter(k["size"] for k in k1), {s: 1 / 8 for s in range(7, 22, 2)})
    fams = Counter(k["family"] for k in k1 if k["family"] != "sinc")
    _chisq_ok(fams, dict(zip(["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                              "plateau_aniso"], [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])))
    gauss = [k for k in k1 if k["family"] != "sinc"]
    _uniform_ok([k["sigma_x"] for k in gauss], 0.2, 3.0)
    _uniform_ok([k["sigma_y"] for k in gauss if "aniso" in k["family"]], 0.2, 3.0)
    _uniform_ok([k["theta"] for k in gauss if "aniso" in k["family"]], -math.pi, math.pi)
    assert all(k["sigma_x"] == k["sigma_y"] and k["theta"] == 0 for k in gauss if "aniso" not in k["family"])
    gb = [k["beta"] for k in gauss if k["family"].startswith("generalized")]
    assert min(gb) >= 0.5 and max(gb) <= 4.0
    _binom_ok(sum(b < 1 for b in gb), len(gb), 0.5)
    pb = [k["beta"] for k in gauss if k["family"].startswith("plateau")]
    assert min(pb) >= 1.0 and max(pb) <= 2.0
    sinc = [k for k in k1 if k["family"] == "sinc"]
    small = [k["omega_c"] for k in sinc if k["size"] < 13]
    large = [k["omega_c"] for k in sinc if k["size"] >= 13]
    assert min(small) >= math.pi / 3 and max(small) <= math.pi
    assert min(large) >= math.pi / 5 and min(large) < math.pi / 3 and max(large) <= math.pi


def test_k2_and_final_sinc_distribution(draws):
    k2 = [d["k2"] for d in draws]
    _binom_ok(sum(k["family"] == "sinc" for k in k2), N, 0.1)
    _uniform_ok([k["sigma_x"] for k in k2 if k["family"] != "sinc"], 0.2, 1.5)
    fs = [d["final_sinc"] for d in draws]
    _binom_ok(sum(k["family"] == "sinc" for k in fs), N, 0.8)
    _uniform_ok([k["omega_c"] for k in fs if k["family"] == "sinc"], math.pi / 3, math.pi)
    _chisq_ok(Counter(k["size"] for k in fs if k["family"] == "sinc"), {s: 1 / 8 for s in range(7, 22, 2)})
    _binom_ok(sum(d["blur2"] for d in draws), N, 0.8)


def test_resize_noise_jpeg_distribution(draws):
    r1 = [d["resize1"] for d in draws]
    _chisq_ok(Counter(r["direction"] for r in r1), {"up": 0.2, "down": 0.7, "keep": 0.1})
    _uniform_ok([r["factor"] for r in r1 if r["direction"] == "up"], 1.0, 1.5)
    _uniform_ok([r["factor"] for r in r1 if r["direction"] == "down"], 0.15, 1.0)
    assert all(r["factor"] == 1.0 for r in r1 if r["direction"] == "keep")
    _chisq_ok(Counter(r["mode"] for r in r1), {"area": 1 / 3, "bilinear": 1 / 3, "bicubic": 1 / 3})
    r2 = [d["resize2"] for d in draws]
    _chisq_ok(Counter(r["direction"] for r in r2), {"up": 0.3, "down": 0.4, "keep": 0.3})
    _uniform_ok([r["factor"] for r in r2 if r["direction"] == "up"], 1.0, 1.2)
    _uniform_ok([r["factor"] for r in r2 if r["direction"] == "down"], 0.3, 1.0)
    for key, sig, pois in (("noise1", (1, 30), (0.05, 3.0)), ("noise2", (1, 25), (0.05, 2.5))):
        n = [d[key] for d in draws]
        _binom_ok(sum(x["type"] == "gaussian" for x in n), N, 0.5)
        _binom_ok(sum(x["gray"] for x in n), N, 0.4)
        _uniform_ok([x["sigma"] for x in n if x["type"] == "gaussian"], *sig)
        _uniform_ok([x["scale"] for x in n if x["type"] == "poisson"], *pois)
    for key in ("jpeg1", "jpeg2"):
        _uniform_ok([d[key]["quality"] for d in draws], 30, 95)
        assert all(30 <= d[key]["quality_int"] <= 95 for d in draws)
    _binom_ok(sum(d["final_order"] == "resize_sinc_then_jpeg" for d in draws), N, 0.5)
    _chisq_ok(Counter(d["resize_back_mode"] for d in draws), {"area": 1 / 3, "bilinear": 1 / 3,
                                                              "bicubic": 1 / 3})


def _photo_crops(photos, n: int, res: int) -> torch.Tensor:
    out = []
    for i, p in enumerate(photos[:n]):
        with Image.open(p) as im:
            arr, _ = random_crop(im, res, seed=i)
        out.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def test_same_seed_same_bytes_variants_differ_and_batch_independent(dcfg, photos):
    hr = _photo_crops(photos, 3, 128)
    hr_before = hr.clone()
    seeds = [sample_seed(0, f"id{i}", 0) for i in range(3)]
    lr_a, pa = degrade(hr, seeds, dcfg)
    lr_b, pb = degrade(hr, seeds, dcfg)
    assert lr_a.numpy().tobytes() == lr_b.numpy().tobytes() and pa == pb
    assert torch.equal(hr, hr_before)  # the GT is untouched (no USM sharpening, no in-place ops)
    one, _ = degrade(hr[1:2], seeds[1:2], dcfg)
    assert torch.equal(one[0], lr_a[1])  # a sample's result does not depend on its batch
    other = [sample_seed(0, f"id{i}", 1) for i in range(3)]
    lr_c, pc = degrade(hr, other, dcfg)
    for i in range(3):
        assert not torch.equal(lr_c[i], lr_a[i])
        assert pc[i] != pa[i]


def test_output_is_8bit_at_hr_size(dcfg, photos):
    hr = _photo_crops(photos, 2, 96)
    lr, params = degrade(hr, [11, 12], dcfg)
    assert lr.shape == hr.shape
    assert float(lr.min()) >= 0 and float(lr.max()) <= 1
    assert torch.equal(lr * 255, (lr * 255).round())
    import json
    json.dumps(params)  # JSON-able
    small = dcfg.__class__(**{**dcfg.__dict__, "resize_back": False})
    lr_small, _ = degrade(hr, [11, 12], small)
    assert lr_small.shape == (2, 3, 24, 24)


def test_degraded_is_lower_quality_than_bicubic_on_average(dcfg, photos):
    hr = _photo_crops(photos, 4, 128)
    real, _ = degrade(hr, list(range(4)), dcfg)
    bic_cfg = dcfg.__class__(**{**dcfg.__dict__, "preset": "bicubic"})
    bic, bp = degrade(hr, list(range(4)), bic_cfg)
    assert torch.equal(bic * 255, (bic * 255).round()) and bic.shape == hr.shape
    bic2, _ = degrade(hr, [99, 98, 97, 96], bic_cfg)
    assert torch.equal(bic, bic2)  # bicubic has no randomness
    err_b = (bic - hr).pow(2).mean()
    err_r = (real - hr).pow(2).mean()
    assert err_b < err_r  # the second-order degradation is harsher than clean bicubic
    assert err_b < 0.01


def test_gaussian_noise_level_matches_sigma():
    from vosr.degrade.ops import gaussian_noise
    img = torch.full((1, 3, 256, 256), 0.5)
    g = torch.Generator().manual_seed(3)
    out = gaussian_noise(img, 20 / 255, gray=False, g=g)
    assert abs(float((out - img).std()) - 20 / 255) < 0.002
    gray = gaussian_noise(img, 20 / 255, gray=True, g=g)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert not torch.equal(out[:, 0], out[:, 1])


def test_jpeg_quality_orders_error(photos):
    from vosr.degrade.ops import jpeg
    hr = _photo_crops(photos, 1, 128)
    e30 = (jpeg(hr, 30) - hr).abs().mean()
    e95 = (jpeg(hr, 95) - hr).abs().mean()
    assert e95 < e30
    assert torch.equal(jpeg(hr, 50), jpeg(hr, 50))


def test_random_crop_upscales_short_side_and_is_seeded():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 100, 3), dtype=np.uint8))
    arr, box = random_crop(img, 64, seed=5)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    left, top, w, h = box
    assert (w, h) == (64, 64) and top == 0 and 0 <= left <= 160 - 64  # short side 40 -> 64, long 100 -> 160
    arr2, box2 = random_crop(img, 64, seed=5)
    assert box2 == box and np.array_equal(arr, arr2)
    boxes = {tuple(random_crop(img, 64, seed=s)[1]) for s in range(20)}
    assert len(boxes) > 5
    big = Image.fromarray(np.zeros((300, 200, 3), dtype=np.uint8))
    _, b = random_crop(big, 64, seed=1)
    assert 0 <= b[0] <= 200 - 64 and 0 <= b[1] <= 300 - 64  # large images are not downscaled


def test_bad_config_and_preset_fail_loudly():
    with pytest.raises(ConfigError, match="kernel_probs"):
        config_from_dict({"degrade": {"realesrgan": {"kernel_probs": [0.5, 0.5, 0, 0, 0, 0.5]}}})
    with pytest.raises(ConfigError, match="resize_prob"):
        config_from_dict({"degrade": {"realesrgan": {"resize_prob": [0.5, 0.4]}}})
    with pytest.raises(KeyError, match="bicubic"):
        get_preset("nope")
    with pytest.raises(ValueError, match="seeds"):
        degrade(torch.zeros(2, 3, 16, 16), [1], config_from_dict({}).degrade)
