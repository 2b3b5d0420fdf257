"""Rectified-flow training with partial conditioning, restoration-oriented guidance and the samplers.

Convention (docs/method.md s5-6, s10.2): t = 0 is data, t = 1 is noise; z_t = (1 - t) x0 + t eps; the network predicts
the velocity eps - x0; sampling integrates with Euler from t = 1 down to t = 0: z <- z - (t_i - t_{i+1}) v.
All training randomness comes from the torch.Generator passed in (its device is where draws happen).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

VelocityFn = Callable[[torch.Tensor, float, float], torch.Tensor]


# --- random draws from a passed generator ----------------------------------------------------------------------

def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def rand(shape, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=_gen_device(generator)).to(device)


def randn(shape, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=_gen_device(generator)).to(device)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample [B] values as [B, 1, 1, ...] to broadcast against `like`."""
    return v.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) x0 + t eps (docs/method.md s5.7)."""
    tb = _bcast(t, x0)
    return (1 - tb) * x0 + tb * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Flow-matching target eps - x0 (docs/method.md s5.7)."""
    return eps - x0


def lr_noise_augment(lq: torch.Tensor, flow_cfg, generator: torch.Generator | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical LR-latent noise augmentation a*lq + sqrt(1-a^2)*eps', a = sigmoid(N(mu, sigma)) per sample
    (docs/method.md s5.5: mu 5, sigma 1 -> median a 0.993). Returns (lq_noised, a)."""
    b = lq.shape[0]
    a = torch.sigmoid(flow_cfg.lr_aug_mu + flow_cfg.lr_aug_sigma * randn((b,), generator, lq.device))
    noise = randn(lq.shape, generator, lq.device).to(lq.dtype)
    ab = _bcast(a, lq)
    return ab * lq + torch.sqrt(1 - ab * ab) * noise, a


def training_inputs(hq: torch.Tensor, lq: torch.Tensor, sem: torch.Tensor, flow_cfg,
                    generator: torch.Generator | None) -> dict[str, Any]:
    """Draw everything one multi-step training step needs (docs/method.md s5).

    t ~ U(0,1) and eps per sample; LR noise augmentation per sample; a Bernoulli(cfg_ratio) partial-branch mask
    per sample whose samples get w*lq (CLEAN lq, w ~ U[min, max] drawn ONCE per batch) and zeroed raw semantic
    tokens (zeroed before the model's LayerNorm + MLP); the others get the noised lq and the full tokens."""
    b, dev = hq.shape[0], hq.device
    t = rand((b,), generator, dev)
    eps = randn(hq.shape, generator, dev).to(hq.dtype)
    lq_noised, a = lr_noise_augment(lq, flow_cfg, generator)
    weak = rand((b,), generator, dev) < flow_cfg.cfg_ratio
    lo, hi = flow_cfg.weak_strength_min, flow_cfg.weak_strength_max
    w = lo + (hi - lo) * float(rand((1,), generator, "cpu").item())  # once per batch
    lq_in = torch.where(_bcast(weak, lq).bool(), w * lq, lq_noised)
    sem_in = torch.where(_bcast(weak, sem).bool(), torch.zeros_like(sem), sem)
    return {"t": t, "eps": eps, "a": a, "weak": weak, "w": w, "lq_in": lq_in, "sem_in": sem_in,
            "z_t": interpolate(hq, eps, t), "target": velocity_target(hq, eps)}


def training_loss(model, hq: torch.Tensor, lq: torch.Tensor, sem: torch.Tensor, flow_cfg,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain MSE over all elements of model(z_t, t, lq_mixed, sem_mixed) - (eps - x0) (docs/method.md s5.8)."""
    d = training_inputs(hq, lq, sem, flow_cfg, generator)
    pred = model(d["z_t"], d["t"], d["lq_in"], d["sem_in"])
    loss = F.mse_loss(pred.float(), d["target"].float())
    stats = {"loss": float(loss.detach()), "weak_fraction": float(d["weak"].float().mean()), "weak_w": d["w"],
             "aug_a_mean": float(d["a"].mean()), "t_mean": float(d["t"].mean())}
    return loss, stats


# --- guidance and samplers (docs/method.md s6, s7 one-step) --------------------------------------------------------

def guide(v_weak: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """v_w + s (v_c - v_w), written as (1-s) v_w + s v_c so s=0 / s=1 give each branch exactly."""
    return (1.0 - scale) * v_weak + scale * v_cond


def timesteps(steps: int, schedule: str = "linear") -> torch.Tensor:
    """N+1 times from 1 to 0 (float64): linear linspace(1, 0, N+1) or cosine cos(linspace(0, pi/2, N+1))."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule == "linear":
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    elif schedule == "cosine":
        ts = torch.cos(torch.linspace(0.0, math.pi / 2, steps + 1, dtype=torch.float64))
        ts[-1] = 0.0
    else:
        raise ValueError(f"unknown schedule {schedule!r}; known schedules: cosine, linear")
    return ts


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, ts) -> torch.Tensor:
    """Integrate z' = v from ts[0] (=1) to ts[-1] (=0): z <- z - (t_i - t_{i+1}) v(z, t_i, t_{i+1})."""
    ts = [float(x) for x in ts]
    z = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity_fn(z, t, t_next)
        z = z - (t - t_next) * v.to(z.dtype)
    return z


def _prepared(model, sem: torch.Tensor, cache: bool):
    """Semantic keys/values computed once for all steps when asked and the model offers it (same numbers, fewer
    FLOPs; costs 2 x depth x N x D values per sample, ~235 MB per doubled 0.5B sample in bf16, so tilers that
    hold many tiles' velocity functions at once should leave it off)."""
    prepare = getattr(model, "prepare_semantic", None)
    if not cache or prepare is None:
        return sem
    with torch.no_grad():
        return prepare(sem)


def multistep_velocity_fn(model, lq: torch.Tensor, sem: torch.Tensor, scale: float,
                          weak_strength: float = 0.15, cache_semantic: bool = False) -> VelocityFn:
    """Guided teacher velocity: conditioned branch (clean lq, a = 1, full tokens) and weak branch
    (weak_strength * lq, zeroed raw tokens) in ONE doubled batch (docs/method.md s6)."""
    lq2 = torch.cat([lq, weak_strength * lq])
    sem2 = _prepared(model, torch.cat([sem, torch.zeros_like(sem)]), cache_semantic)

    def fn(z: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        b = z.shape[0]
        tt = torch.full((2 * b,), float(t), device=z.device)
        v = model(torch.cat([z, z]), tt, lq2, sem2)
        v_cond, v_weak = v[:b], v[b:]
        return guide(v_weak, v_cond, scale)

    return fn


def fewstep_velocity_fn(model, lq: torch.Tensor, sem: torch.Tensor, cache_semantic: bool = False) -> VelocityFn:
    """Student velocity f(z, t, r = t_next) with clean lq and full tokens, no CFG (docs/method.md s7)."""
    sem = _prepared(model, sem, cache_semantic)

    def fn(z: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        b = z.shape[0]
        tt = torch.full((b,), float(t), device=z.device)
        rr = torch.full((b,), float(t_next), device=z.device)
        return model(z, tt, lq, sem, r=rr)

    return fn


def _noise(lq: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    if noise is not None:
        if noise.shape != lq.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have the LR-latent shape {tuple(lq.shape)}")
        return noise
    return randn(lq.shape, generator, lq.device).to(lq.dtype)


def sample_multistep(model, lq: torch.Tensor, sem: torch.Tensor, steps: int = 25, schedule: str = "linear",
                     guidance_scale: float = 0.5, weak_strength: float = 0.15, noise: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Guided multi-step Euler sampling (2 NFEs per step) from z_1 ~ N(0, I) of the LR-latent shape."""
    fn = multistep_velocity_fn(model, lq, sem, guidance_scale, weak_strength, cache_semantic=True)
    return euler_sample(fn, _noise(lq, noise, generator), timesteps(steps, schedule))


def sample_fewstep(model, lq: torch.Tensor, sem: torch.Tensor, steps: int = 1, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Student sampler on a linear schedule, r = t_next; one step is z0 = z1 - f(z1, 1, 0)."""
    if not getattr(model, "is_student", False):
        raise ValueError("sample_fewstep needs a student model (built with student=True)")
    return euler_sample(fewstep_velocity_fn(model, lq, sem, cache_semantic=steps > 1), _noise(lq, noise, generator),
                        timesteps(steps, "linear"))
