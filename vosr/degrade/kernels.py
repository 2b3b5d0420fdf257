"""Blur kernels of the Real-ESRGAN degradation (docs/method.md s1): Gaussian families, plateau, sinc, delta.

All kernels are built in float64 from explicit parameters, normalised to sum 1 and zero-padded to a square of
`pad_to` pixels. `sample_kernel` draws the parameters from a per-sample torch.Generator and returns them as a
JSON-able dict, so a kernel can be rebuilt from its parameters alone (`build_kernel`).
"""

from __future__ import annotations

import math

import torch

from .rand import choice, randint, uniform

SINC_SMALL_LIMIT = 13  # docs/method.md s1: omega_c ~ U[pi/3, pi] if size < 13, else U[pi/5, pi]


def _grid(size: int) -> torch.Tensor:
    """[size, size, 2] pixel offsets from the centre (x along columns, y along rows)."""
    ax = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def _inverse_sigma(sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """Inverse of the covariance U diag(sx^2, sy^2) U^T with U the rotation by theta."""
    c, s = math.cos(theta), math.sin(theta)
    u = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    d = torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64))
    return torch.linalg.inv(u @ d @ u.T)


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    g = _grid(size)
    inv = _inverse_sigma(sigma_x, sigma_y, theta)
    return ((g @ inv) * g).sum(-1)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    k = torch.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta))
    return k / k.sum()


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float,
                                beta: float) -> torch.Tensor:
    k = torch.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta).pow(beta))
    return k / k.sum()


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> torch.Tensor:
    k = 1.0 / (_quadratic_form(size, sigma_x, sigma_y, theta).pow(beta) + 1.0)
    return k / k.sum()


def sinc_kernel(size: int, omega_c: float) -> torch.Tensor:
    """Circular low-pass (2D sinc) kernel with cutoff omega_c; centre value is its limit omega_c^2 / (4 pi)."""
    g = _grid(size)
    r = g.pow(2).sum(-1).sqrt()
    safe = torch.where(r > 0, r, torch.ones_like(r))
    k = omega_c * torch.special.bessel_j1(omega_c * safe) / (2 * math.pi * safe)
    k = torch.where(r > 0, k, torch.full_like(k, omega_c**2 / (4 * math.pi)))
    return k / k.sum()


def delta_kernel(size: int) -> torch.Tensor:
    k = torch.zeros(size, size, dtype=torch.float64)
    k[size // 2, size // 2] = 1.0
    return k


def pad_kernel(k: torch.Tensor, pad_to: int) -> torch.Tensor:
    p = (pad_to - k.shape[0]) // 2
    return torch.nn.functional.pad(k, (p, p, p, p)) if p > 0 else k


def build_kernel(params: dict, pad_to: int) -> torch.Tensor:
    """The float64 [pad_to, pad_to] kernel described by a parameter dict from `sample_kernel`."""
    fam, size = params["family"], int(params["size"])
    if fam == "delta":
        k = delta_kernel(size)
    elif fam == "sinc":
        k = sinc_kernel(size, params["omega_c"])
    elif fam in ("iso", "aniso"):
        k = gaussian_kernel(size, params["sigma_x"], params["sigma_y"], params["theta"])
    elif fam in ("generalized_iso", "generalized_aniso"):
        k = generalized_gaussian_kernel(size, params["sigma_x"], params["sigma_y"], params["theta"], params["beta"])
    elif fam in ("plateau_iso", "plateau_aniso"):
        k = plateau_kernel(size, params["sigma_x"], params["sigma_y"], params["theta"], params["beta"])
    else:
        raise ValueError(f"unknown kernel family {fam!r}; known: delta, sinc, iso, aniso, generalized_iso, "
                         "generalized_aniso, plateau_iso, plateau_aniso")
    return pad_kernel(k, pad_to)


def _beta(g: torch.Generator, rng: list[float]) -> float:
    # Real-ESRGAN: half the draws below 1 (U[low, 1]), half above (U[1, high]).
    if uniform(g, 0.0, 1.0) < 0.5:
        return uniform(g, rng[0], 1.0)
    return uniform(g, 1.0, rng[1])


def sample_kernel(g: torch.Generator, sizes: list[int], families: list[str], probs: list[float], sinc_prob: float,
                  sigma: list[float], betag: list[float], betap: list[float]) -> dict:
    """Draw one blur kernel's parameters (k1 or k2 of docs/method.md s1)."""
    size = int(sizes[randint(g, len(sizes))])
    if uniform(g, 0.0, 1.0) < sinc_prob:
        lo = math.pi / 3 if size < SINC_SMALL_LIMIT else math.pi / 5
        return {"family": "sinc", "size": size, "omega_c": uniform(g, lo, math.pi)}
    fam = families[choice(g, probs)]
    sx = uniform(g, sigma[0], sigma[1])
    if fam.endswith("iso") and not fam.endswith("aniso"):
        sy, theta = sx, 0.0
    else:
        sy, theta = uniform(g, sigma[0], sigma[1]), uniform(g, -math.pi, math.pi)
    out = {"family": fam, "size": size, "sigma_x": sx, "sigma_y": sy, "theta": theta}
    if fam.startswith("generalized"):
        out["beta"] = _beta(g, betag)
    elif fam.startswith("plateau"):
        out["beta"] = _beta(g, betap)
    return out


def sample_final_sinc(g: torch.Generator, sizes: list[int], prob: float) -> dict:
    """The final sinc filter: with probability `prob` a sinc of random size, omega_c ~ U[pi/3, pi]; else delta."""
    if uniform(g, 0.0, 1.0) < prob:
        size = int(sizes[randint(g, len(sizes))])
        return {"family": "sinc", "size": size, "omega_c": uniform(g, math.pi / 3, math.pi)}
    return {"family": "delta", "size": 1}
