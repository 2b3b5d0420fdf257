"""Second-order Real-ESRGAN x4 degradation (docs/method.md s1), with every draw per image (docs/method.md s0).

`sample_params` draws all discrete and continuous choices of one image from its generator, in a fixed order, into a
JSON-able dict; `apply` runs the two stages with those choices, drawing the noise fields from the same generator.
Order (docs/method.md s1): stage 1 blur k1 -> resize -> noise -> clamp -> JPEG; stage 2 blur k2 (p=0.8) -> resize to
(ori/scale)*s -> noise; final 50/50 [resize to ori/scale + sinc] then JPEG, or JPEG then [resize + sinc];
resize back to HR size with a random mode; 8-bit rounding. The ground truth is never sharpened (no USM).
"""

from __future__ import annotations

import torch

from . import ops
from .kernels import build_kernel, sample_final_sinc, sample_kernel
from .rand import choice, randint, uniform

DIRECTIONS = ("up", "down", "keep")


def _resize_choice(g: torch.Generator, probs: list[float], rng: list[float]) -> dict:
    direction = DIRECTIONS[choice(g, probs)]
    if direction == "up":
        factor = uniform(g, 1.0, rng[1])
    elif direction == "down":
        factor = uniform(g, rng[0], 1.0)
    else:
        factor = 1.0
    return {"direction": direction, "factor": factor}


def _noise_choice(g: torch.Generator, gauss_prob: float, sigma_range: list[float], poisson_range: list[float],
                  gray_prob: float) -> dict:
    if uniform(g, 0.0, 1.0) < gauss_prob:
        out = {"type": "gaussian", "sigma": uniform(g, sigma_range[0], sigma_range[1])}  # in 8-bit levels
    else:
        out = {"type": "poisson", "scale": uniform(g, poisson_range[0], poisson_range[1])}
    out["gray"] = bool(uniform(g, 0.0, 1.0) < gray_prob)
    return out


def _mode(g: torch.Generator, modes: list[str]) -> str:
    return modes[randint(g, len(modes))]


def _quality(g: torch.Generator, rng: list[float]) -> dict:
    q = uniform(g, rng[0], rng[1])
    return {"quality": q, "quality_int": int(round(q))}


def sample_params(g: torch.Generator, rc) -> dict:
    """All choices of one image. `rc` is a RealESRGANConfig."""
    p: dict = {}
    p["k1"] = sample_kernel(g, rc.kernel_sizes, rc.kernel_families, rc.kernel_probs, rc.sinc_prob, rc.blur_sigma,
                            rc.betag_range, rc.betap_range)
    p["k2"] = sample_kernel(g, rc.kernel_sizes, rc.kernel_families, rc.kernel_probs2, rc.sinc_prob2,
                            rc.blur_sigma2, rc.betag_range2, rc.betap_range2)
    p["final_sinc"] = sample_final_sinc(g, rc.kernel_sizes, rc.final_sinc_prob)
    p["resize1"] = _resize_choice(g, rc.resize_prob, rc.resize_range) | {"mode": _mode(g, rc.resize_modes)}
    p["noise1"] = _noise_choice(g, rc.gaussian_noise_prob, rc.noise_range, rc.poisson_scale_range,
                                rc.gray_noise_prob)
    p["jpeg1"] = _quality(g, rc.jpeg_range)
    p["blur2"] = bool(uniform(g, 0.0, 1.0) < rc.second_blur_prob)
    p["resize2"] = _resize_choice(g, rc.resize_prob2, rc.resize_range2) | {"mode": _mode(g, rc.resize_modes)}
    p["noise2"] = _noise_choice(g, rc.gaussian_noise_prob2, rc.noise_range2, rc.poisson_scale_range2,
                                rc.gray_noise_prob2)
    p["final_order"] = "resize_sinc_then_jpeg" if uniform(g, 0.0, 1.0) < rc.final_order_prob else \
        "jpeg_then_resize_sinc"
    p["final_resize_mode"] = _mode(g, rc.resize_modes)
    p["jpeg2"] = _quality(g, rc.jpeg_range2)
    p["resize_back_mode"] = _mode(g, rc.resize_modes)
    return p


def _noise(x: torch.Tensor, n: dict, g: torch.Generator) -> torch.Tensor:
    if n["type"] == "gaussian":
        return ops.gaussian_noise(x, n["sigma"] / 255.0, n["gray"], g)
    return ops.poisson_noise(x, n["scale"], n["gray"], g)


def apply(hr: torch.Tensor, p: dict, g: torch.Generator, rc, scale: int, resize_back: bool,
          timings: dict | None = None) -> torch.Tensor:
    """Degrade one image [1, 3, H, W] in [0, 1] with parameters `p`; noise fields drawn from `g`."""
    import time

    def tick(name: str, t0: float) -> float:
        t1 = time.perf_counter()
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + (t1 - t0)
        return t1

    t = time.perf_counter()
    ori_h, ori_w = hr.shape[-2:]
    k1 = build_kernel(p["k1"], rc.kernel_pad_to)
    k2 = build_kernel(p["k2"], rc.kernel_pad_to)
    sinc = build_kernel(p["final_sinc"], rc.kernel_pad_to)
    t = tick("kernels", t)
    # stage 1
    x = ops.filter2d(hr, k1)
    t = tick("blur", t)
    x = ops.resize(x, p["resize1"]["mode"], scale=p["resize1"]["factor"])
    t = tick("resize", t)
    x = _noise(x, p["noise1"], g)
    t = tick("noise", t)
    x = ops.jpeg(x.clamp(0, 1), p["jpeg1"]["quality_int"])
    t = tick("jpeg", t)
    # stage 2
    if p["blur2"]:
        x = ops.filter2d(x, k2)
    t = tick("blur", t)
    s2 = p["resize2"]["factor"]
    x = ops.resize(x, p["resize2"]["mode"], size=(int(ori_h / scale * s2), int(ori_w / scale * s2)))
    t = tick("resize", t)
    x = _noise(x, p["noise2"], g)
    t = tick("noise", t)
    # final step
    lr_size = (ori_h // scale, ori_w // scale)
    def resize_sinc(x: torch.Tensor, t: float) -> tuple[torch.Tensor, float]:
        x = ops.resize(x, p["final_resize_mode"], size=lr_size)
        t = tick("resize", t)
        x = ops.filter2d(x, sinc)
        return x, tick("blur", t)

    if p["final_order"] == "resize_sinc_then_jpeg":
        x, t = resize_sinc(x, t)
        x = ops.jpeg(x.clamp(0, 1), p["jpeg2"]["quality_int"])
        t = tick("jpeg", t)
    else:
        x = ops.jpeg(x.clamp(0, 1), p["jpeg2"]["quality_int"])
        t = tick("jpeg", t)
        x, t = resize_sinc(x, t)
    if resize_back:
        x = ops.resize(x, p["resize_back_mode"], size=(ori_h, ori_w))
    x = ops.quantize8(x)
    tick("resize", t)
    return x
