"""Full-scale details: the fp32 residual stream under bf16 autocast and DINOv2's own position-embedding
interpolation, each checked against an independent computation; plus unit checks of method details that no other
test guards (initialisations, distillation targets, noise levels, colour statistics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jobkit.config import config_from_dict
from tests.helpers.models import randomise
from vosr.model import build_dit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**over):
    data = {"preset": "tiny"}
    data.update(over)
    return config_from_dict(data)


def _inputs(b=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 48, h, w, generator=g), torch.rand(b, generator=g), torch.randn(b, 48, h, w, generator=g),
            torch.randn(b, 64, 64, generator=g))


# --- item 2: fp32 residual stream under bf16 autocast ---------------------------------------------------------------

def test_blocks_keep_a_float32_residual_stream_under_bf16_autocast():
    torch.manual_seed(0)
    m = randomise(build_dit(_cfg()), 1).eval()
    z, t, lq, sem = _inputs()
    seen = []
    hooks = [b.register_forward_hook(lambda mod, args, out: seen.append(out.dtype)) for b in m.blocks]
    with torch.no_grad():
        ref = m(z, t, lq, sem).float()
        assert seen == [torch.float32] * len(m.blocks)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(z, t, lq, sem)
    for h in hooks:
        h.remove()
    # every block returns float32 (the fp32 table promotes the bf16 t_block output as in the reference)
    assert seen == [torch.float32] * len(m.blocks)
    # ... and the output stays close to fp32 inference (bf16 matmuls only; ~1e-2 relative for the tiny model)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.03, float(rel)


def test_bf16_residual_stream_would_drift_further_than_the_fp32_one():
    """What the fix buys, measured: forcing the block outputs to bf16 (the old behaviour) moves the output
    further from fp32 than the fp32 residual stream does."""
    torch.manual_seed(0)
    m = randomise(build_dit(_cfg()), 1).eval()
    z, t, lq, sem = _inputs(seed=3)
    with torch.no_grad():
        ref = m(z, t, lq, sem).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            good = m(z, t, lq, sem).float()
            hooks = [b.register_forward_hook(lambda mod, args, out: out.bfloat16()) for b in m.blocks]
            bad = m(z, t, lq, sem).float()
    for h in hooks:
        h.remove()
    assert (good - ref).norm() < (bad - ref).norm()


def test_model_cast_to_bf16_still_runs_without_autocast():
    m = build_dit(_cfg()).eval().to(torch.bfloat16)
    z, t, lq, sem = _inputs()
    with torch.no_grad():
        out = m(z.bfloat16(), t, lq.bfloat16(), sem.bfloat16())
    assert out.shape == z.shape and torch.isfinite(out.float()).all()


# --- item 5: DINOv2 position-embedding interpolation ----------------------------------------------------------------

def _cubic_weights(t, a=-0.75):
    """Keys' cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (a = -0.75, PyTorch's bicubic)."""
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _hand_resize_1d(m_in, n_out, scale_factor):
    """[n_out, m_in] matrix of bicubic resampling driven by a scale factor: the source coordinate of output i is
    (i + 0.5) / scale_factor - 0.5 (align_corners False, not recomputed from the sizes), taps clamped to the
    border."""
    mat = np.zeros((n_out, m_in))
    for i in range(n_out):
        x = (i + 0.5) / scale_factor - 0.5
        x0 = math.floor(x)
        for k, wk in zip(range(-1, 3), _cubic_weights(x - x0)):
            mat[i, min(max(x0 + k, 0), m_in - 1)] += wk
    return mat


def test_dinov2_position_resampling_is_the_scale_factor_path_by_hand(tmp_path):
    from safetensors.torch import save_file

    from vosr.encoders.semantic import dinov2_resample_pos_embed, load_vit_weights, make_vit

    arch = {"patch_size": 14, "dim": 8, "depth": 1, "num_heads": 2}
    src_m, n = 9, 7  # a checkpoint grid of 9x9 (126 px) loaded into a 7x7 (98 px) model
    donor = make_vit(arch, src_m * 14, True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        donor.pos_embed.copy_(torch.randn(donor.pos_embed.shape, generator=g))
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / "w.safetensors"))
    vit = make_vit(arch, n * 14, True)
    load_vit_weights(vit, tmp_path / "w.safetensors")

    pe = donor.pos_embed.detach().double()[0]
    mat = _hand_resize_1d(src_m, n, (n + 0.1) / src_m)
    grid = pe[1:].reshape(src_m, src_m, -1).numpy()
    hand = np.einsum("ia,jb,abd->ijd", mat, mat, grid).reshape(n * n, -1)
    got = vit.pos_embed.detach().double()[0]
    assert torch.equal(got[0], pe[0])  # the CLS position is kept
    np.testing.assert_allclose(got[1:].numpy(), hand, atol=1e-5)
    # the size-driven path (scale src/n) samples elsewhere: the test tells the two apart
    size_mat = _hand_resize_1d(src_m, n, n / src_m)
    size_hand = np.einsum("ia,jb,abd->ijd", size_mat, size_mat, grid).reshape(n * n, -1)
    assert np.abs(size_hand - hand).max() > 1e-2
    # the function itself at the released model's shapes: 37x37 -> 32x32 (518 -> 448 px)
    big = torch.randn(1, 1 + 37 * 37, 4, generator=g)
    out = dinov2_resample_pos_embed(big, (32, 32))
    m37 = _hand_resize_1d(37, 32, 32.1 / 37)
    hand37 = np.einsum("ia,jb,abd->ijd", m37, m37, big[0, 1:].double().reshape(37, 37, 4).numpy())
    np.testing.assert_allclose(out[0, 1:].double().numpy(), hand37.reshape(1024, 4), atol=1e-5)


# --- item 7: details right today, now guarded ----------------------------------------------------------------------

def test_student_r_embedder_is_drawn_from_normal_0_002_with_zero_biases():
    from scipy import stats

    from vosr import distill

    cfg = config_from_dict({"preset": "tiny", "model": {"hidden_size": 256, "num_heads": 4}})
    torch.manual_seed(0)
    teacher = build_dit(cfg)
    torch.manual_seed(1)
    for student in (build_dit(cfg, student=True), distill.student_from_teacher(teacher, cfg)):
        for layer in (student.r_embedder.mlp[0], student.r_embedder.mlp[2]):
            w = layer.weight.detach().double().flatten().numpy()
            # docs/method.md s4: timestep MLPs N(0, 0.02) (not xavier: a uniform of that width fails the KS test)
            assert stats.kstest(w, "norm", args=(0.0, 0.02)).pvalue > 1e-4
            assert stats.kstest(w, "uniform", args=(-w.std() * 3 ** 0.5, 2 * w.std() * 3 ** 0.5)).pvalue < 1e-6
            assert torch.count_nonzero(layer.bias) == 0


class _Spy(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.is_student = model, [], model.is_student

    def forward(self, z, t, lq, sem, r=None):
        self.calls.append((z.clone(), torch.as_tensor(t).clone(), lq.clone(), sem.clone(),
                           None if r is None else torch.as_tensor(r).clone()))
        return self.model(z, t, lq, sem, r=r)


def _distill_setup(method):
    from vosr import distill

    cfg = config_from_dict({"preset": "tiny", "distill": {"method": method}})
    torch.manual_seed(0)
    teacher = randomise(build_dit(cfg), 2).eval()
    torch.manual_seed(1)
    student = randomise(distill.student_from_teacher(teacher, cfg), 3, names=("final_layer", "r_embedder"),
                         std=0.05).eval()
    g = torch.Generator().manual_seed(4)
    hq, lq = torch.randn(3, 48, 8, 8, generator=g), torch.randn(3, 48, 8, 8, generator=g)
    sem = torch.randn(3, 64, 64, generator=g)
    return cfg, teacher, student, hq, lq, sem


def test_shortcut_target_is_the_average_velocity_through_the_midpoint_state():
    from vosr import distill

    cfg, teacher, student, hq, lq, sem = _distill_setup("shortcut")
    spy = _Spy(student)
    with torch.no_grad():
        _, st = distill.distill_loss(spy, teacher, hq, lq, sem, cfg.distill, cfg.flow,
                                     torch.Generator().manual_seed(5))
    z2, t2, lq2, sem2, r2 = spy.calls[0]  # the doubled forward: (z_t, t, r=t) then (z_t, t, r)
    b = hq.shape[0]
    z_t, t, r, lq_in, sem_in = z2[:b], t2[:b], r2[b:], lq2[:b], sem2[:b]
    assert torch.equal(r2[:b], t)
    # docs/method.md s7 shortcut, by hand: s = (t+r)/2; v1 = f(z_t, t, s); z_s = z_t - (t-r)/2 v1; v2 = f(z_s, s, r)
    with torch.no_grad():
        s = (t + r) / 2
        v1 = student(z_t, t, lq_in, sem_in, r=s)
        z_s = z_t - ((t - r) / 2).view(-1, 1, 1, 1) * v1
        v2 = student(z_s, s, lq_in, sem_in, r=r)
        u = student(z_t, t, lq_in, sem_in, r=r)
    target = (v1 + v2) / 2
    assert st["consistency_loss"] == pytest.approx(float(((u - target) ** 2).mean()), rel=1e-4)
    # a wrong target (the end-point velocity alone) would give a different loss
    assert abs(float(((u - v2) ** 2).mean()) - st["consistency_loss"]) > 1e-4 * st["consistency_loss"]
    torch.testing.assert_close(spy.calls[2][0], z_s, atol=1e-5, rtol=1e-5)


def test_self_distillation_fallback_guides_between_ground_truth_and_the_students_weak_branch():
    from vosr import distill

    cfg, _, student, hq, lq, sem = _distill_setup("rcgm")
    d = distill.distill_inputs(student, None, hq, lq, sem, cfg.distill, cfg.flow, torch.Generator().manual_seed(6))
    with torch.no_grad():  # docs/method.md s7: v_cond = eps - hq, v_weak = student(0.1 lq, zero tokens, r = t)
        v_w = student(d["z_t"], d["t"], 0.1 * lq, torch.zeros_like(sem), r=d["t"])
    v_c = d["eps"] - hq
    omega = cfg.distill.omega
    assert omega == 0.5 and cfg.distill.weak_strength == 0.1
    torch.testing.assert_close(d["v_guide"], v_w + omega * (v_c - v_w), atol=1e-5, rtol=1e-5)


def test_loop_optimizer_clip_and_ema_follow_method_s5():
    from training.loop import make_optimizer, optimizer_step
    from vosr.ema import EMA

    cfg = config_from_dict({"preset": "tiny"})
    tc = cfg.train
    assert tuple(tc.betas) == (0.9, 0.95) and tc.adam_eps == 1e-8 and tc.weight_decay == 0.01
    assert tc.grad_clip == 1.0 and tc.ema_decay == 0.9999
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = make_optimizer(model.parameters(), tc)
    (group,) = opt.param_groups  # one group: weight decay on ALL parameters, norms and biases included
    assert isinstance(opt, torch.optim.AdamW) and group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8
    assert group["weight_decay"] == 0.01 and len(group["params"]) == len(list(model.parameters()))

    ema = EMA(model, 0.5)  # a visible decay for the arithmetic below
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema_before = {n: p.clone() for n, p in ema.module.named_parameters()}
    x = torch.randn(8, 4) * 100
    model(x).pow(2).sum().backward()
    raw = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert raw > 1.0
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = optimizer_step(model, opt, ema, tc.grad_clip)
    assert float(norm) == pytest.approx(float(raw), rel=1e-5)  # pre-clip norm reported
    assert all(p.grad is None for p in model.parameters())
    # AdamW step 1 by hand with the clipped gradient: m/(sqrt(v)+eps) = g/(|g|+eps) after bias correction
    lr = tc.lr
    for n, p in model.named_parameters():
        g = grads[n] * (1.0 / (float(raw) + 1e-6))
        expect = before[n] * (1 - lr * 0.01) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expect, atol=1e-9, rtol=1e-6)
        # one EMA update per optimiser step: e <- d e + (1 - d) p
        torch.testing.assert_close(ema.module.get_parameter(n), 0.5 * ema_before[n] + 0.5 * p.detach())
    assert ema.num_updates == 1


def test_init_from_resets_the_ema_to_the_loaded_weights(tmp_path):
    from training.loop import init_from_checkpoint
    from training.objectives import PretrainObjective
    from vosr.checkpoint import save_checkpoint
    from vosr.ema import EMA

    cfg = config_from_dict({"preset": "tiny"})
    torch.manual_seed(1)
    src = randomise(build_dit(cfg), 7)
    save_checkpoint(str(tmp_path / "stage1"), cfg, src, ema=src)
    objective = PretrainObjective(cfg, torch.device("cpu"))
    torch.manual_seed(2)
    model = objective.build_model()
    ema = EMA(model, 0.9999)
    assert not torch.equal(ema.module.final_layer.linear.weight, src.final_layer.linear.weight)
    init_from_checkpoint(objective, model, ema, str(tmp_path / "stage1"))
    for (n, a), b in zip(src.state_dict().items(), ema.module.state_dict().values()):
        assert torch.equal(a, b), n


def test_generalised_and_plateau_gaussians_and_sinc_centre_by_formula():
    from scipy import special

    from vosr.degrade import kernels

    size, sx, sy, th, beta = 7, 1.3, 0.6, 0.4, 1.7
    c, s = math.cos(th), math.sin(th)
    rot = np.array([[c, -s], [s, c]])
    inv = np.linalg.inv(rot @ np.diag([sx ** 2, sy ** 2]) @ rot.T)
    ax = np.arange(-(size // 2), size // 2 + 1)
    q = np.zeros((size, size))
    for i, y in enumerate(ax):
        for j, x in enumerate(ax):
            v = np.array([x, y])
            q[i, j] = v @ inv @ v
    gen = np.exp(-0.5 * q ** beta)  # Real-ESRGAN generalised Gaussian: exp(-0.5 (x^T S^-1 x)^beta)
    plat = 1.0 / (q ** beta + 1.0)  # plateau: 1 / ((x^T S^-1 x)^beta + 1)
    np.testing.assert_allclose(kernels.generalized_gaussian_kernel(size, sx, sy, th, beta).numpy(),
                               gen / gen.sum(), rtol=1e-10)
    np.testing.assert_allclose(kernels.plateau_kernel(size, sx, sy, th, beta).numpy(), plat / plat.sum(),
                               rtol=1e-10)
    # sinc: omega J1(omega r) / (2 pi r), centre = its limit omega^2 / (4 pi), then normalised
    w = 2.1
    r = np.sqrt(ax[None, :] ** 2 + ax[:, None] ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = w * special.j1(w * r) / (2 * np.pi * r)
    k[size // 2, size // 2] = w ** 2 / (4 * np.pi)
    np.testing.assert_allclose(kernels.sinc_kernel(size, w).numpy(), k / k.sum(), rtol=1e-5, atol=1e-9)


def test_poisson_noise_levels_are_the_next_power_of_two_of_distinct_8bit_values():
    from vosr.degrade import ops

    # Real-ESRGAN: levels = 2^ceil(log2(#distinct 8-bit values)); out = poisson(x * levels) / levels at scale 1
    vals = torch.tensor([0, 40, 90, 160, 250], dtype=torch.float32) / 255
    for n_distinct, levels in ((5, 8), (3, 4), (2, 2)):
        img = vals[torch.arange(3 * 24 * 24) % n_distinct].view(1, 3, 24, 24)
        out = ops.poisson_noise(img, 1.0, False, torch.Generator().manual_seed(n_distinct))
        k = out * levels
        assert torch.allclose(k, k.round(), atol=1e-4), levels  # on the grid of 1/levels ...
        half = out * (levels // 2)
        assert not torch.allclose(half, half.round(), atol=1e-4), levels  # ... and not on a coarser one
    # the scale multiplies the noise: out = x + scale * (poisson / levels - x), before the clip
    img = vals[torch.arange(3 * 24 * 24) % 5].view(1, 3, 24, 24)
    a = ops.poisson_noise(img, 1.0, False, torch.Generator().manual_seed(9))
    b = ops.poisson_noise(img, 0.25, False, torch.Generator().manual_seed(9))
    inside = (a > 0) & (a < 1) & (b > 0) & (b < 1)
    torch.testing.assert_close(b[inside], (img + 0.25 * (a - img))[inside], atol=1e-6, rtol=1e-6)


def test_adain_uses_the_unbiased_std_with_eps_added_to_the_std():
    """The authors' adain_color_fix adds eps to torch.std (after the root); tests/unit/test_released.py also compares
    whole upscales with their code."""
    from vosr.colorfix import ADAIN_EPS, adain

    assert ADAIN_EPS == 1e-5  # docs/method.md s8
    x = torch.tensor([0.1, 0.2, 0.6, 0.3], dtype=torch.float64).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    ref = torch.tensor([0.5, 0.9, 0.7, 0.5, 0.6, 0.8], dtype=torch.float64).view(1, 1, 2, 3).repeat(1, 3, 1, 1)
    rs = ref[0, 0].flatten()
    xv = x[0, 0].flatten()
    mx, vx = xv.mean(), ((xv - xv.mean()) ** 2).sum() / (xv.numel() - 1)  # unbiased: n - 1
    mr, vr = rs.mean(), ((rs - rs.mean()) ** 2).sum() / (rs.numel() - 1)
    hand = (xv - mx) / (torch.sqrt(vx) + 1e-5) * (torch.sqrt(vr) + 1e-5) + mr
    torch.testing.assert_close(adain(x, ref)[0, 0].flatten(), hand, atol=1e-12, rtol=1e-12)
    # the biased std or eps inside the root would each give other numbers
    biased = (xv - mx) / (torch.sqrt(vx * 3 / 4) + 1e-5) * (torch.sqrt(vr * 5 / 6) + 1e-5) + mr
    inside = (xv - mx) / torch.sqrt(vx + 1e-5) * torch.sqrt(vr + 1e-5) + mr
    assert (biased - hand).abs().max() > 1e-3 and (inside - hand).abs().max() > 1e-7
