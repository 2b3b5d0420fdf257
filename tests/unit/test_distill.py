"""One-step distillation against docs/method.md s7 / s10.9 and paper A.1."""

from __future__ import annotations

import math

import pytest
import torch

from jobkit.config import config_from_dict
from vosr import distill
from vosr.model import build_dit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cfg_tiny(**distill_keys):
    return config_from_dict({"preset": "tiny", "distill": distill_keys})


def teacher_model(seed=0):
    torch.manual_seed(seed)
    m = build_dit(cfg_tiny())
    with torch.no_grad():
        for p in m.final_layer.parameters():
            p.normal_(0, 0.05)
    return m.eval()


def batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 48, 8, 8, generator=g), torch.randn(b, 48, 8, 8, generator=g),
            torch.randn(b, 64, 64, generator=g))


def test_t_r_sampling_distribution():
    n = 40000
    t, r = distill.sample_t_r(n, torch.Generator().manual_seed(0))
    assert ((r >= 0) & (r <= t) & (t <= 1)).all()
    # t = max(u1, u2): density 2t -> mean 2/3, P(t < 0.5) = 1/4
    assert abs(float(t.mean()) - 2 / 3) < 0.01
    assert abs(float((t < 0.5).float().mean()) - 0.25) < 0.01
    # r = t * U: r / t uniform
    ratio = r / t
    assert abs(float(ratio.mean()) - 0.5) < 0.01 and abs(float(ratio.var()) - 1 / 12) < 0.005


def test_fresh_student_equals_teacher_at_r_equal_t():
    teacher = teacher_model()
    student = distill.student_from_teacher(teacher, cfg_tiny())
    assert student.is_student and student.r_embedder is not None
    # the r-embedder is newly initialised (not zero), so the gap term really is what vanishes at r = t
    assert float(student.r_embedder.mlp[0].weight.detach().abs().sum()) > 0
    hq, lq, sem = batch(3)
    t = torch.tensor([0.9, 0.4, 0.05])
    with torch.no_grad():
        v_t = teacher(hq, t, lq, sem)
        v_s = student(hq, t, lq, sem, r=t)
        v_far = student(hq, t, lq, sem, r=t * 0.3)
    torch.testing.assert_close(v_s, v_t, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(v_far, v_t, atol=1e-4)


def test_student_from_teacher_rejects_foreign_weights():
    other = build_dit(config_from_dict({"preset": "tiny", "model": {"depth": 2}}))
    with pytest.raises(ValueError, match="do not fit"):
        distill.student_from_teacher(other.state_dict() | {"bogus.weight": torch.zeros(1)}, cfg_tiny())


def test_teacher_target_is_guided_combination():
    teacher = teacher_model()
    hq, lq, sem = batch(2)
    t = torch.tensor([0.7, 0.3])
    lq_noised = lq + 0.1
    with torch.no_grad():
        v_c = teacher(hq, t, lq_noised, sem)
        v_w = teacher(hq, t, 0.1 * lq, torch.zeros_like(sem))
    for omega in (0.0, 0.5, 1.0):
        got = distill.teacher_target(teacher, hq, t, lq_noised, lq, sem, omega, 0.1)
        torch.testing.assert_close(got, v_w + omega * (v_c - v_w), atol=1e-5, rtol=1e-5)


def test_distill_inputs_same_guided_target_for_weak_samples():
    cfg = cfg_tiny()
    teacher = teacher_model()
    student = distill.student_from_teacher(teacher, cfg)
    n = 64
    g = torch.Generator().manual_seed(0)
    hq = torch.randn(n, 48, 2, 2, generator=g)
    lq = torch.rand(n, 48, 2, 2, generator=g) + 0.5
    sem = torch.randn(n, 4, 64, generator=g)
    d = distill.distill_inputs(student, teacher, hq, lq, sem, cfg.distill, cfg.flow, g)
    weak = d["weak"]
    assert 0 < int(weak.sum()) < n
    torch.testing.assert_close(d["lq_in"][weak], 0.1 * lq[weak], atol=0, rtol=0)  # fixed w = 0.1
    assert torch.count_nonzero(d["sem_in"][weak]) == 0
    torch.testing.assert_close(d["lq_in"][~weak], d["lq_noised"][~weak], atol=0, rtol=0)
    # the teacher target (every sample, weak ones included): noise-augmented lq + full tokens vs 0.1 lq + no tokens
    ref = distill.teacher_target(teacher, d["z_t"], d["t"], d["lq_noised"], lq, sem, 0.5, 0.1)
    torch.testing.assert_close(d["v_guide"], ref)


def test_rcgm_coefficients_and_clip_on_a_toy():
    t = torch.tensor([0.5, 0.505, 0.3])
    r = torch.tensor([0.2, 0.5, 0.3])
    c_l, c_r = distill.rcgm_coefficients(t, r, 0.01)
    torch.testing.assert_close(c_l, torch.tensor([30.0, 1.0, 1.0]))  # far: d/Delta; near: 1
    assert float(c_r[0]) == pytest.approx(100.0) and float(c_r[1]) == pytest.approx(200.0, rel=1e-3)
    assert math.isfinite(float(c_r[2]))  # r == t does not divide by zero
    u = torch.tensor([[0.10, 0.0], [0.3, -2.0], [0.5, 0.5]])
    disp = torch.tensor([[2.95, 0.0], [0.0, 0.0], [0.0, 0.0]])
    v_guide = torch.tensor([[0.05, 0.0], [0.1, 0.0], [0.5, 0.0]])
    corr = distill.rcgm_correction(u, disp, v_guide, t, r, 0.01, 1.0)
    # far sample: 30*0.1 - 100*2.95 - 0.05 = -292.05 -> -1 ; 30*0 - 0 - 0 = 0
    # near sample: 1*0.3 - 200*0 - 0.1 = 0.2 ; -2 - 0 - 0 -> -1 (clip)
    # r == t: 0.5 - 0 - 0.5 = 0 ; 0.5 - 0 - 0 = 0.5
    expected = torch.tensor([[-1.0, 0.0], [0.2, -1.0], [0.0, 0.5]])
    torch.testing.assert_close(corr, expected, atol=1e-5, rtol=0)
    # far, unclipped: consistency d*u = Delta*v_guide + F gives zero correction
    t2, r2 = torch.tensor([0.8]), torch.tensor([0.4])
    u2 = torch.tensor([[0.7]])
    v2 = torch.tensor([[1.0]])
    f2 = 0.4 * u2 - 0.01 * v2
    torch.testing.assert_close(distill.rcgm_correction(u2, f2, v2, t2, r2, 0.01), torch.zeros(1, 1),
                               atol=1e-5, rtol=0)


def test_rcgm_rollout_near_is_zero_and_far_uses_student_steps():
    teacher = teacher_model()
    student = distill.student_from_teacher(teacher, cfg_tiny())
    with torch.no_grad():
        for p in student.r_embedder.parameters():
            p.normal_(0, 0.05)
    hq, lq, sem = batch(2)
    v_guide = torch.randn_like(hq)
    t = torch.tensor([0.6, 0.6])
    r = torch.tensor([0.595, 0.2])  # near, far
    disp = distill.rcgm_rollout(student, hq, t, r, v_guide, lq, sem, 0.01, 2)
    assert torch.count_nonzero(disp[0]) == 0
    # far: warm start z_m = z_t - Delta v_guide, then 2 student steps 0.59 -> 0.395 -> 0.2 with r = t_{k+1}
    with torch.no_grad():
        z = hq[1:] - 0.01 * v_guide[1:]
        f1 = student(z, torch.tensor([0.59]), lq[1:], sem[1:], r=torch.tensor([0.395]))
        z = z - 0.195 * f1
        f2 = student(z, torch.tensor([0.395]), lq[1:], sem[1:], r=torch.tensor([0.2]))
    torch.testing.assert_close(disp[1:], 0.195 * f1 + 0.195 * f2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["rcgm", "shortcut"])
def test_distill_loss_trains_student_only(method):
    cfg = cfg_tiny(method=method)
    teacher = teacher_model()
    student = distill.student_from_teacher(teacher, cfg).train()
    hq, lq, sem = batch(4)
    loss, stats = distill.distill_loss(student, teacher, hq, lq, sem, cfg.distill, cfg.flow,
                                       torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(stats["loss"]) and stats["loss"] == pytest.approx(
        stats["base_loss"] + stats["consistency_loss"], rel=1e-5)
    assert all(p.grad is None for p in teacher.parameters())
    assert student.final_layer.linear.weight.grad is not None
    assert float(student.r_embedder.mlp[2].weight.grad.abs().sum()) > 0
    # self-distillation fallback (no teacher) runs too
    loss2, _ = distill.distill_loss(student, None, hq, lq, sem, cfg.distill, cfg.flow,
                                    torch.Generator().manual_seed(0))
    assert math.isfinite(float(loss2.detach()))


def test_distillation_step_reduces_loss():
    cfg = cfg_tiny()
    teacher = teacher_model()
    student = distill.student_from_teacher(teacher, cfg).train()
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3)
    hq, lq, sem = batch(4)
    losses = []
    for _ in range(12):
        loss, _ = distill.distill_loss(student, teacher, hq, lq, sem, cfg.distill, cfg.flow,
                                       torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
