"""One-step distillation of the guided teacher into a student f(z_t, t, r, kappa) (docs/method.md s7, paper A.1).

Teacher target v_guide = v_w + omega (v_c - v_w): v_c from the noise-augmented lq and the full tokens, v_w from
weak_strength * lq (0.1) and zeroed tokens; the same target for every sample, including the student's 10% in the
weak input mode. Base loss ||f(z_t, t, r=t) - v_guide||^2 plus a consistency term for r < t: RCGM (default,
Delta 0.01, 2-step student roll-out, near/far coefficients, element-wise clip) or the midpoint shortcut variant.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .flow import _bcast, guide, interpolate, lr_noise_augment, rand, randn, velocity_target


def sample_t_r(batch: int, generator: torch.Generator | None, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """t = max(u1, u2) (density 2t, toward noise), r = t * (1 - g), g ~ U(0, 1) = Beta(1, 1) (docs/method.md s7)."""
    u = rand((2, batch), generator, device)
    t = torch.maximum(u[0], u[1])
    g = rand((batch,), generator, device)
    return t, t * (1 - g)


@torch.no_grad()
def teacher_target(teacher: nn.Module, z_t: torch.Tensor, t: torch.Tensor, lq_cond: torch.Tensor,
                   lq_clean: torch.Tensor, sem: torch.Tensor, omega: float = 0.5,
                   weak_strength: float = 0.1) -> torch.Tensor:
    """v_w + omega (v_c - v_w); v_c = T(z_t, t, lq_cond, sem), v_w = T(z_t, t, w * lq_clean, 0); one batch."""
    b = z_t.shape[0]
    v = teacher(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([lq_cond, weak_strength * lq_clean]),
                torch.cat([sem, torch.zeros_like(sem)]))
    return guide(v[b:].float(), v[:b].float(), omega)


def rcgm_coefficients(t: torch.Tensor, r: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, d = t - r: near (d < Delta) c_l = 1, c_r = 1/d; far c_l = d/Delta, c_r = 1/Delta."""
    d = t - r
    near = d < delta
    c_l = torch.where(near, torch.ones_like(d), d / delta)
    c_r = torch.where(near, 1.0 / d.clamp_min(1e-12), torch.full_like(d, 1.0 / delta))
    return c_l, c_r


def rcgm_correction(u: torch.Tensor, displacement: torch.Tensor, v_guide: torch.Tensor, t: torch.Tensor,
                    r: torch.Tensor, delta: float, clip: float = 1.0) -> torch.Tensor:
    """corr = clamp(c_l u - c_r F - v_guide, -clip, clip), element-wise (paper eq. 14)."""
    c_l, c_r = rcgm_coefficients(t, r, delta)
    raw = _bcast(c_l, u) * u - _bcast(c_r, u) * displacement - v_guide
    return raw.clamp(-clip, clip)


@torch.no_grad()
def rcgm_rollout(student: nn.Module, z_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v_guide: torch.Tensor,
                 lq_in: torch.Tensor, sem_in: torch.Tensor, delta: float, steps: int) -> torch.Tensor:
    """Teacher-guided warm start to t_m = max(t - Delta, r), then `steps` student Euler steps t_m -> r with
    (t_k, r = t_{k+1}) conditioning; returns the displacement F = sum dt_k f(z_k, t_k, t_{k+1})."""
    t_m = torch.maximum(t - delta, r)
    z = z_t - _bcast(t - t_m, z_t) * v_guide.to(z_t.dtype)
    disp = torch.zeros_like(v_guide)
    for k in range(steps):
        t_k = t_m + (r - t_m) * (k / steps)
        t_k1 = t_m + (r - t_m) * ((k + 1) / steps) if k + 1 < steps else r
        dt = _bcast(t_k - t_k1, z)
        f = student(z, t_k, lq_in, sem_in, r=t_k1).float()
        disp = disp + dt.float() * f
        z = z - dt * f.to(z.dtype)
    return disp


def distill_inputs(student: nn.Module, teacher: nn.Module | None, hq: torch.Tensor, lq: torch.Tensor,
                   sem: torch.Tensor, distill_cfg, flow_cfg, generator: torch.Generator | None) -> dict[str, Any]:
    """Draw (t, r), eps, the LR augmentation and the 90/10 input mix, and compute the teacher target."""
    b, dev = hq.shape[0], hq.device
    t, r = sample_t_r(b, generator, dev)
    eps = randn(hq.shape, generator, dev).to(hq.dtype)
    z_t = interpolate(hq, eps, t)
    lq_noised, a = lr_noise_augment(lq, flow_cfg, generator)
    weak = rand((b,), generator, dev) < flow_cfg.cfg_ratio
    ws = distill_cfg.weak_strength  # fixed 0.1 in distillation (docs/method.md s7)
    lq_in = torch.where(_bcast(weak, lq).bool(), ws * lq, lq_noised)
    sem_in = torch.where(_bcast(weak, sem).bool(), torch.zeros_like(sem), sem)
    if teacher is not None:
        teacher.eval()
        v_guide = teacher_target(teacher, z_t, t, lq_noised, lq, sem, distill_cfg.omega, ws)
    else:  # self-distillation (reference fallback): v_c = ground truth, v_w from the student itself
        with torch.no_grad():
            v_w = student(z_t, t, ws * lq, torch.zeros_like(sem), r=t).float()
        v_guide = guide(v_w, velocity_target(hq, eps).float(), distill_cfg.omega)
    return {"t": t, "r": r, "eps": eps, "z_t": z_t, "a": a, "lq_noised": lq_noised, "weak": weak,
            "lq_in": lq_in, "sem_in": sem_in, "v_guide": v_guide}


def distill_loss(student: nn.Module, teacher: nn.Module | None, hq: torch.Tensor, lq: torch.Tensor,
                 sem: torch.Tensor, distill_cfg, flow_cfg, generator: torch.Generator | None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Base + consistency_weight * (RCGM | shortcut) loss for one batch (docs/method.md s7)."""
    d = distill_inputs(student, teacher, hq, lq, sem, distill_cfg, flow_cfg, generator)
    b = hq.shape[0]
    t, r, z_t, lq_in, sem_in, v_guide, weak = (d[k] for k in ("t", "r", "z_t", "lq_in", "sem_in", "v_guide",
                                                               "weak"))

    # base (r = t) and the compressed prediction u (t -> r) in one doubled forward, both with grad
    out = student(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([lq_in, lq_in]),
                  torch.cat([sem_in, sem_in]), r=torch.cat([t, r])).float()
    f_diag, u = out[:b], out[b:]
    base = F.mse_loss(f_diag, v_guide)

    if distill_cfg.method == "rcgm":
        disp = rcgm_rollout(student, z_t, t, r, v_guide, lq_in, sem_in, distill_cfg.delta_t,
                            distill_cfg.rollout_steps)
        corr = rcgm_correction(u.detach(), disp, v_guide, t, r, distill_cfg.delta_t, distill_cfg.clip)
        target = (u.detach() - corr).detach()
    elif distill_cfg.method == "shortcut":
        with torch.no_grad():
            s = (t + r) / 2
            v1 = student(z_t, t, lq_in, sem_in, r=s).float()
            z_s = z_t - _bcast((t - r) / 2, z_t) * v1.to(z_t.dtype)
            v2 = student(z_s, s, lq_in, sem_in, r=r).float()
            target = (v1 + v2) / 2
    else:
        raise ValueError(f"unknown distillation method {distill_cfg.method!r}; known methods: rcgm, shortcut")
    cons = F.mse_loss(u, target)
    loss = base + distill_cfg.consistency_weight * cons
    stats: dict[str, Any] = {"loss": float(loss.detach()), "base_loss": float(base.detach()),
                             "consistency_loss": float(cons.detach()), "t_mean": float(t.mean()),
                             "gap_mean": float((t - r).mean()), "weak_fraction": float(weak.float().mean())}
    return loss, stats


def student_from_teacher(teacher_model: nn.Module | dict, cfg) -> nn.Module:
    """A student with the teacher's (EMA) weights and a fresh random r-embedder (the only missing keys).

    On r = t the gap factor (t - r) is zero, so the fresh student equals the teacher exactly there."""
    from .model import build_dit

    state = teacher_model if isinstance(teacher_model, dict) else teacher_model.state_dict()
    student = build_dit(cfg, student=True, train_grid=getattr(teacher_model, "train_grid", None))
    missing, unexpected = student.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not k.startswith("r_embedder.")]
    if bad_missing or unexpected:
        raise ValueError(f"teacher weights do not fit the student: missing {bad_missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    if isinstance(teacher_model, nn.Module):
        p, q = next(teacher_model.parameters()), next(student.parameters())
        if (p.device, p.dtype) != (q.device, q.dtype):   # moved only when needed (fake tensors cannot move)
            student = student.to(device=p.device, dtype=p.dtype)
    return student
