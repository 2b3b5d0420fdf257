"""Independent fidelity checks of the method library against docs/method.md (s1, s4-s7, s10).

Each test recomputes a detail by hand from docs/method.md (not from the code under test) and compares, so it fails if
the detail is wrong: adaLN-single chunk order and the raw cross-attention, QK-norm before 2D RoPE, the final layer
on c (not c0), the gap-scaled r embedding, init rules, the rectified-flow training draws (per-sample t, a, mask;
per-batch w; clean w*lq; zeroed raw tokens), the guided sampler and its branches, the Euler direction, the
one-step sampler, (t, r) sampling, the teacher target and the whole RCGM loss, and the degradation order.
Models are the tiny preset (a few ms per forward); spies below only record calls and delegate to the real code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from jobkit.config import config_from_dict
from tests.helpers.models import randomise
from vosr import distill, flow
from vosr.model import build_dit

ALPHA = 1e-4  # fixed seeds: the statistical checks are deterministic; a correct sampler passes with margin


def _cfg(**over):
    data = {"preset": "tiny"}
    data.update(over)
    return config_from_dict(data)


def _inputs(b=2, h=8, w=8, seed=0, c=48, n_sem=64, d_sem=64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, h, w, generator=g), torch.rand(b, generator=g), torch.randn(b, c, h, w, generator=g),
            torch.randn(b, n_sem, d_sem, generator=g))


def _rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class Recorder(torch.nn.Module):
    """Delegates to the real model and records each call's inputs (a spy, not a stand-in)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []
        self.is_student = model.is_student

    def forward(self, z, t, lq, sem, r=None):
        self.calls.append({"z": z.clone(), "t": torch.as_tensor(t).clone(), "lq": lq.clone(), "sem": sem.clone(),
                           "r": None if r is None else torch.as_tensor(r).clone()})
        return self.model(z, t, lq, sem, r=r)


# --- docs/method.md s4 / s10.7: block layout ----------------------------------------------------------------------------

def _hand_rope(x, h, w, head_dim, theta=10000.0):
    """EVA 2D RoPE by hand: first half of the channels rotate with the row, second with the column; adjacent
    channel pairs (2i, 2i+1) rotate by position * theta^(-2i' / (head_dim/2)) with i' the pair index per axis."""
    half = head_dim // 2
    out = x.clone()
    for row in range(h):
        for col in range(w):
            n = row * w + col
            for k in range(0, head_dim, 2):
                pos, kk = (row, k) if k < half else (col, k - half)
                ang = pos * theta ** (-(kk // 2) * 2 / half)
                c, s = math.cos(ang), math.sin(ang)
                a, b = x[..., n, k], x[..., n, k + 1]
                out[..., n, k] = a * c - b * s
                out[..., n, k + 1] = b * c + a * s
    return out


def test_self_attention_is_qknorm_then_2d_rope_then_sdpa():
    m = build_dit(_cfg())
    attn = m.blocks[1].attn
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (attn.q_norm.weight, attn.k_norm.weight, attn.qkv.bias):
            p.copy_(torch.randn(p.shape, generator=g))
    assert attn.q_norm.eps == pytest.approx(1e-6) and attn.k_norm.eps == pytest.approx(1e-6)
    b, gh, gw, d, nh = 2, 8, 8, m.hidden_size, m.num_heads  # the training grid: integer positions
    hd = d // nh
    x = torch.randn(b, gh * gw, d, generator=g)
    with torch.no_grad():
        got = attn(x, m.rope(gh, gw, x.device))
        qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).view(b, gh * gw, 3, nh, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = _hand_rope(_rms(q, attn.q_norm.weight), gh, gw, hd)
        k = _hand_rope(_rms(k, attn.k_norm.weight), gh, gw, hd)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        want = att.transpose(1, 2).reshape(b, gh * gw, d) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_cross_attention_has_no_positions_and_rmsnorm_qk():
    m = build_dit(_cfg())
    ca = m.blocks[0].cross_attn
    assert type(ca.q_norm).__name__ == "RMSNorm" and type(ca.k_norm).__name__ == "RMSNorm"
    assert ca.q_norm.eps == pytest.approx(1e-6)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, m.hidden_size, generator=g)
    ctx = torch.randn(2, 10, m.hidden_size, generator=g)
    with torch.no_grad():
        out = ca(x, ctx)
        px, pc = torch.randperm(16, generator=g), torch.randperm(10, generator=g)
        # no RoPE on queries: permuting image tokens permutes the output; no positions on the semantic tokens
        torch.testing.assert_close(ca(x[:, px], ctx), out[:, px], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ca(x, ctx[:, pc]), out, atol=1e-5, rtol=1e-5)
    assert not [n for n, _ in m.named_parameters() if "pos" in n]  # no absolute positional embedding
    assert not [n for n in m.state_dict() if "rope" in n or "freqs" in n]


def test_block_update_sequence_and_adaln_chunk_order():
    m = build_dit(_cfg())
    blk = m.blocks[2]
    d = m.hidden_size
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, d, generator=g)
    ctx = torch.randn(2, 7, d, generator=g)
    c0 = torch.randn(2, 6 * d, generator=g) * 0.5
    with torch.no_grad():
        blk.norm1.weight.copy_(1 + 0.3 * torch.randn(d, generator=g))
        blk.norm2.weight.copy_(1 + 0.3 * torch.randn(d, generator=g))
    rope = m.rope(4, 4, x.device)

    def reference(order):
        mods = blk.scale_shift_table[None] + c0.view(2, 6, d)
        ch = dict(zip(order, mods.unbind(1)))
        sh1, sc1, g1 = (ch[k][:, None] for k in ("shift_msa", "scale_msa", "gate_msa"))
        sh2, sc2, g2 = (ch[k][:, None] for k in ("shift_mlp", "scale_mlp", "gate_mlp"))
        h = x + g1 * blk.attn(_rms(x, blk.norm1.weight) * (1 + sc1) + sh1, rope)
        h = h + blk.cross_attn(h, ctx)  # raw residual stream as the query: no norm, no modulation, no gate
        return h + g2 * blk.mlp(_rms(h, blk.norm2.weight) * (1 + sc2) + sh2)

    method = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")  # docs/method.md s4
    with torch.no_grad():
        got = blk(x, c0, ctx, rope)
        torch.testing.assert_close(got, reference(method), atol=1e-5, rtol=1e-5)
        swapped = ("scale_msa", "shift_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
        assert not torch.allclose(got, reference(swapped), atol=1e-3)  # the comparison is order-sensitive


def test_final_layer_is_modulated_by_c_not_c0():
    m = randomise(build_dit(_cfg(), student=True), 6, names=("final_layer", "r_embedder"))
    z, t, lq, sem = _inputs()
    r = t * 0.3
    seen = {}
    h1 = m.final_layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], c=args[1], out=out))
    with torch.no_grad():
        m(z, t, lq, sem, r=r)
        c = m.t_embedder(t) + m.r_embedder(r) * (t - r)[:, None]
    h1.remove()
    torch.testing.assert_close(seen["c"], c, atol=1e-6, rtol=1e-5)  # D wide: c, not the 6D c0
    fl = m.final_layer
    with torch.no_grad():
        mod = F.silu(c) @ fl.adaLN_modulation[1].weight.T + fl.adaLN_modulation[1].bias
        shift, scale = mod[:, None, :m.hidden_size], mod[:, None, m.hidden_size:]
        want = (_rms(seen["x"], fl.norm.weight) * (1 + scale) + shift) @ fl.linear.weight.T + fl.linear.bias
    torch.testing.assert_close(seen["out"], want, atol=1e-5, rtol=1e-5)


def test_r_embedding_is_gap_scaled_embedding_of_r_and_student_equals_teacher_on_diagonal():
    cfg = _cfg()
    teacher = randomise(build_dit(cfg), 7)
    student = distill.student_from_teacher(teacher, cfg)
    assert student.is_student and set(student.state_dict()) - set(teacher.state_dict()) == {
        k for k in student.state_dict() if k.startswith("r_embedder.")}
    z, t, lq, sem = _inputs(h=4, w=4, seed=1)
    r = torch.tensor([0.1, 0.6]) * t
    with torch.no_grad():
        torch.testing.assert_close(student.condition(t, r), student.t_embedder(t)
                                   + student.r_embedder(r) * (t - r)[:, None], atol=1e-6, rtol=1e-6)
        # the embedder sees r itself, not the gap
        assert not torch.allclose(student.condition(t, r),
                                  student.t_embedder(t) + student.r_embedder(t - r) * (t - r)[:, None])
        torch.testing.assert_close(student(z, t, lq, sem, r=t), teacher(z, t, lq, sem), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(student(z, t, lq, sem, r=r), teacher(z, t, lq, sem), atol=1e-6)


def test_init_patch_embed_xavier_on_flattened_weight_and_non_zero_gates_and_cross_proj():
    torch.manual_seed(11)
    m = build_dit(_cfg())
    w = m.x_embedder.weight.detach()
    out_c, in_c, kh, kw = w.shape
    bound = math.sqrt(6 / (out_c + in_c * kh * kw))  # xavier on the [D, 2C*p*p] matrix, not on the 4D conv
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.95 * bound
    assert float(w.abs().max()) > 1.05 * math.sqrt(6 / (out_c * kh * kw + in_c * kh * kw))
    for blk in m.blocks:
        assert torch.count_nonzero(blk.cross_attn.proj.weight) > 0  # not zero-initialised
        assert torch.count_nonzero(blk.scale_shift_table[2]) > 0 and torch.count_nonzero(blk.scale_shift_table[5])
    sp = m.sem_proj
    assert torch.equal(sp.norm.weight, torch.ones_like(sp.norm.weight)) and torch.count_nonzero(sp.norm.bias) == 0
    fb = math.sqrt(6 / (sp.fc1.in_features + sp.fc1.out_features))
    assert float(sp.fc1.weight.detach().abs().max()) <= fb and torch.count_nonzero(sp.fc1.bias) == 0
    for emb in (m.t_embedder.mlp[0], m.t_embedder.mlp[2]):
        assert torch.count_nonzero(emb.bias) == 0


def test_zeroed_raw_tokens_reach_every_block_as_one_learned_constant_token():
    m = build_dit(_cfg())
    with torch.no_grad():
        m.sem_proj.norm.bias.copy_(torch.randn(m.sem_proj.norm.bias.shape, generator=torch.Generator().manual_seed(2)))
    z, t, lq, _ = _inputs()
    seen = []
    hooks = [blk.cross_attn.register_forward_hook(lambda mod, args, out: seen.append(args[1])) for blk in m.blocks]
    with torch.no_grad():
        m(z, t, lq, torch.zeros(2, 64, 64))
        want = m.sem_proj.fc2(F.gelu(m.sem_proj.fc1(m.sem_proj.norm.bias), approximate="tanh"))
    for h in hooks:
        h.remove()
    assert len(seen) == len(m.blocks)
    for ctx in seen:
        assert torch.equal(ctx, seen[0])  # computed once, shared by all blocks
        torch.testing.assert_close(ctx, want.expand_as(ctx), atol=1e-6, rtol=1e-5)
    assert float(want.abs().max()) > 1e-3  # the null token is learned, not zero


# --- docs/method.md s5 / s10.2-10.4: training draws -------------------------------------------------------------------

def test_training_inputs_flow_convention_and_per_sample_draws():
    cfg = _cfg()
    b = 4000
    g = torch.Generator().manual_seed(21)
    hq = torch.randn(b, 2, 2, 2, generator=g)
    lq = torch.randn(b, 2, 2, 2, generator=g) + 0.5
    sem = torch.randn(b, 3, 5, generator=g)
    d = flow.training_inputs(hq, lq, sem, cfg.flow, torch.Generator().manual_seed(1))
    t, eps, a, weak = d["t"], d["eps"], d["a"], d["weak"]
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(d["z_t"], (1 - tb) * hq + tb * eps)  # t = 0 data, t = 1 noise
    torch.testing.assert_close(d["target"], eps - hq)
    assert stats.kstest(t.numpy(), "uniform").pvalue > ALPHA  # t ~ U(0, 1) per sample
    assert stats.binomtest(int(weak.sum()), b, 0.1).pvalue > ALPHA  # Bernoulli(0.1) per sample
    # a = sigmoid(N(5, 1)) per sample
    logit = torch.log(a / (1 - a)).double().numpy()
    assert stats.kstest(logit, "norm", args=(5.0, 1.0)).pvalue > ALPHA
    # weak samples: w * CLEAN lq (one w for the batch) and zeroed raw tokens
    w = d["w"]
    assert 0.05 <= w <= 0.25
    assert torch.equal(d["lq_in"][weak], w * lq[weak])
    assert torch.count_nonzero(d["sem_in"][weak]) == 0 and torch.equal(d["sem_in"][~weak], sem[~weak])
    # full samples: spherical a*lq + sqrt(1 - a^2)*eps' with eps' ~ N(0, 1)
    ab = a.view(-1, 1, 1, 1)
    resid = ((d["lq_in"] - ab * lq) / torch.sqrt(1 - ab * ab))[~weak]
    assert abs(float(resid.mean())) < 0.03 and abs(float(resid.std()) - 1.0) < 0.03


def test_weak_strength_is_drawn_once_per_batch_uniformly():
    cfg = _cfg()
    ws = []
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        lq = torch.rand(64, 1, 2, 2, generator=g) + 0.5
        d = flow.training_inputs(torch.zeros_like(lq), lq, torch.ones(64, 2, 3), cfg.flow,
                                 torch.Generator().manual_seed(1000 + seed))
        weak = d["weak"]
        if int(weak.sum()) >= 2:
            ratio = d["lq_in"][weak] / lq[weak]
            torch.testing.assert_close(ratio, torch.full_like(ratio, d["w"]))  # one w for all weak samples
        ws.append(d["w"])
    assert stats.kstest(np.array(ws), "uniform", args=(0.05, 0.20)).pvalue > ALPHA


def test_training_loss_is_plain_mse_of_the_model_on_the_mixed_inputs():
    cfg = _cfg()
    m = randomise(build_dit(cfg), 8, std=0.5)
    randomise(m, 9, names=("t_embedder", "t_block"), std=0.3)  # make the output depend strongly on t
    z, _, lq, sem = _inputs(b=6, h=4, w=4, seed=3)
    hq = z
    loss, st = flow.training_loss(m, hq, lq, sem, cfg.flow, torch.Generator().manual_seed(9))
    d = flow.training_inputs(hq, lq, sem, cfg.flow, torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = ((m(d["z_t"], d["t"], d["lq_in"], d["sem_in"]) - (d["eps"] - hq)) ** 2).mean()
        other = ((m(d["z_t"], 1 - d["t"], d["lq_in"], d["sem_in"]) - (d["eps"] - hq)) ** 2).mean()
    torch.testing.assert_close(loss.detach(), want, atol=1e-6, rtol=1e-5)
    assert abs(float(other) - float(want)) > 1e-3 * float(want)  # the comparison is sensitive to t


# --- docs/method.md s6 / s10.2, s10.5: sampler --------------------------------------------------------------------------

def test_timesteps_and_euler_direction():
    torch.testing.assert_close(flow.timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    calls = []

    def fn(z, t, t_next):
        calls.append((t, t_next))
        return z  # z' = z

    noise = torch.ones(1, 1, 2, 2)
    out = flow.euler_sample(fn, noise, flow.timesteps(4))
    assert calls == [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)]
    torch.testing.assert_close(out, noise * 0.75 ** 4)  # z <- z - (t_i - t_{i+1}) v, from 1 down to 0


def test_multistep_guidance_branches_and_formula():
    cfg = _cfg()
    assert cfg.flow.weak_strength == 0.15 and cfg.flow.steps == 25 and cfg.flow.guidance_scale == 0.5
    rec = Recorder(randomise(build_dit(cfg), 9))
    _, _, lq, sem = _inputs(h=4, w=4, seed=4)
    noise = torch.randn(lq.shape, generator=torch.Generator().manual_seed(5))
    s = -0.5
    out = flow.sample_multistep(rec, lq, sem, steps=2, guidance_scale=s, weak_strength=0.15, noise=noise)
    assert len(rec.calls) == 2  # one doubled batch per step: 2 NFEs per step
    for call, tv in zip(rec.calls, (1.0, 0.5)):
        assert call["z"].shape[0] == 4 and torch.allclose(call["t"], torch.full((4,), tv))
        assert call["r"] is None
        assert torch.equal(call["lq"][:2], lq) and torch.equal(call["sem"][:2], sem)  # clean LR (a = 1), tokens
        torch.testing.assert_close(call["lq"][2:], 0.15 * lq)  # weak branch: w * lq, zero raw tokens
        assert torch.count_nonzero(call["sem"][2:]) == 0
    m = rec.model
    z = noise
    with torch.no_grad():
        for t0, t1 in ((1.0, 0.5), (0.5, 0.0)):
            tt = torch.full((2,), t0)
            v_c = m(z, tt, lq, sem)
            v_w = m(z, tt, 0.15 * lq, torch.zeros_like(sem))
            z = z - (t0 - t1) * (v_w + s * (v_c - v_w))
    torch.testing.assert_close(out, z, atol=1e-5, rtol=1e-5)


def test_one_step_sampler_is_z1_minus_f_at_t1_r0_without_cfg():
    cfg = _cfg()
    student = randomise(distill.student_from_teacher(randomise(build_dit(cfg), 10), cfg), 11,
                         names=("r_embedder",), std=0.1)
    rec = Recorder(student)
    _, _, lq, sem = _inputs(h=4, w=4, seed=6)
    noise = torch.randn(lq.shape, generator=torch.Generator().manual_seed(7))
    out = flow.sample_fewstep(rec, lq, sem, steps=1, noise=noise)
    assert len(rec.calls) == 1 and rec.calls[0]["z"].shape[0] == 2  # one NFE, no doubled CFG batch
    c = rec.calls[0]
    assert torch.allclose(c["t"], torch.ones(2)) and torch.allclose(c["r"], torch.zeros(2))
    assert torch.equal(c["lq"], lq) and torch.equal(c["sem"], sem)
    with torch.no_grad():
        want = noise - student(noise, torch.ones(2), lq, sem, r=torch.zeros(2))
    torch.testing.assert_close(out, want)
    rec.calls.clear()
    flow.sample_fewstep(rec, lq, sem, steps=2, noise=noise)
    assert [(float(c["t"][0]), float(c["r"][0])) for c in rec.calls] == [(1.0, 0.5), (0.5, 0.0)]


# --- docs/method.md s7 / s10.9: distillation ------------------------------------------------------------------------

def test_t_r_sampling_distribution():
    t, r = distill.sample_t_r(20000, torch.Generator().manual_seed(3))
    assert stats.kstest(t.numpy(), lambda x: np.clip(x, 0, 1) ** 2).pvalue > ALPHA  # max(u1, u2): CDF t^2
    assert bool((r <= t).all()) and bool((r >= 0).all())
    assert stats.kstest((r / t).numpy(), "uniform").pvalue > ALPHA  # r = t * U


def test_distill_defaults():
    dc = _cfg().distill
    assert (dc.method, dc.omega, dc.weak_strength, dc.delta_t, dc.rollout_steps, dc.consistency_weight,
            dc.clip) == ("rcgm", 0.5, 0.1, 0.01, 2, 1.0, 1.0)


def _distill_setup(cfg_ratio=0.5):
    cfg = _cfg(flow={"cfg_ratio": cfg_ratio}, model={"depth": 2})
    teacher = randomise(build_dit(cfg), 12)
    student = randomise(distill.student_from_teacher(teacher, cfg), 13, names=("final_layer",), std=0.05)
    randomise(student, 14, names=("r_embedder",), std=0.3)  # r must matter: u (r < t) far from f (r = t)
    hq, _, lq, sem = _inputs(b=8, h=4, w=4, seed=8)
    return cfg, teacher, student, hq, lq, sem


def test_teacher_target_uses_noise_augmented_lr_w01_and_omega_for_every_sample():
    cfg, teacher, student, hq, lq, sem = _distill_setup()
    d = distill.distill_inputs(student, teacher, hq, lq, sem, cfg.distill, cfg.flow,
                               torch.Generator().manual_seed(4))
    weak = d["weak"]
    assert 0 < int(weak.sum()) < 8  # both input modes present in this batch
    assert not torch.allclose(d["lq_noised"], lq, atol=1e-4)  # augmentation is applied to the teacher's LR
    torch.testing.assert_close(d["lq_in"][weak], 0.1 * lq[weak])
    assert torch.count_nonzero(d["sem_in"][weak]) == 0
    with torch.no_grad():
        v_c = teacher(d["z_t"], d["t"], d["lq_noised"], sem)
        v_w = teacher(d["z_t"], d["t"], 0.1 * lq, torch.zeros_like(sem))
    # one guided target for every sample, whatever the student's input mode
    torch.testing.assert_close(d["v_guide"], v_w + 0.5 * (v_c - v_w), atol=1e-5, rtol=1e-5)
    tb = d["t"].view(-1, 1, 1, 1)
    torch.testing.assert_close(d["z_t"], (1 - tb) * hq + tb * d["eps"])


def test_rcgm_coefficients_and_clip():
    t = torch.tensor([0.5, 0.5, 0.9])
    r = torch.tensor([0.495, 0.2, 0.0])
    c_l, c_r = distill.rcgm_coefficients(t, r, 0.01)
    torch.testing.assert_close(c_l, torch.tensor([1.0, 30.0, 90.0]), rtol=1e-4, atol=0)  # near 1, far d/Delta
    torch.testing.assert_close(c_r, torch.tensor([200.0, 100.0, 100.0]), rtol=1e-4, atol=0)  # near 1/d, far 1/Delta
    u = torch.full((3, 1, 1, 1), 2.0)
    corr = distill.rcgm_correction(u, torch.zeros_like(u), torch.zeros_like(u), t, r, 0.01, 1.0)
    assert corr.flatten().tolist() == [1.0, 1.0, 1.0]  # element-wise clip to [-1, 1]
    u1 = u[:1] * 0.1
    corr = distill.rcgm_correction(u1, torch.zeros_like(u1), torch.full_like(u1, 0.05), t[:1], r[:1], 0.01)
    assert float(corr) == pytest.approx(0.15)


def test_rcgm_rollout_warm_start_and_student_steps():
    cfg, teacher, student, hq, lq, sem = _distill_setup()
    g = torch.Generator().manual_seed(15)
    z_t = torch.randn(hq.shape, generator=g)
    t = torch.tensor([0.9, 0.5, 0.3, 0.2, 0.8, 0.05, 0.6, 0.4])
    r = torch.tensor([0.0, 0.495, 0.1, 0.19, 0.5, 0.0, 0.3, 0.35])  # far and near (t - r < 0.01) cases
    v_g = torch.randn(hq.shape, generator=g) * 3
    disp = distill.rcgm_rollout(student, z_t, t, r, v_g, lq, sem, 0.01, 2)

    def hand(warm: bool):
        out = torch.zeros_like(z_t)
        with torch.no_grad():
            for i in range(len(t)):
                ti, ri = float(t[i]), float(r[i])
                tm = max(ti - 0.01, ri)
                z = z_t[i:i + 1] - ((ti - tm) * v_g[i:i + 1] if warm else 0)
                for k in range(2):
                    a, b = tm + (ri - tm) * k / 2, tm + (ri - tm) * (k + 1) / 2
                    f = student(z, torch.tensor([a]), lq[i:i + 1], sem[i:i + 1], r=torch.tensor([b]))
                    out[i:i + 1] += (a - b) * f
                    z = z - (a - b) * f
        return out

    want = hand(True)
    torch.testing.assert_close(disp, want, atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(disp[1]) == 0  # near case: t_m = r, nothing to roll out
    assert not torch.allclose(hand(False), want, atol=1e-4)  # the warm start is visible


def test_rcgm_loss_end_to_end_with_student_rollout_and_stop_gradient():
    cfg, teacher, student, hq, lq, sem = _distill_setup(cfg_ratio=0.1)
    seed = 6
    loss, st = distill.distill_loss(student, teacher, hq, lq, sem, cfg.distill, cfg.flow,
                                    torch.Generator().manual_seed(seed))
    d = distill.distill_inputs(student, teacher, hq, lq, sem, cfg.distill, cfg.flow,
                               torch.Generator().manual_seed(seed))
    t, r, z_t, lq_in, sem_in, v_g = (d[k] for k in ("t", "r", "z_t", "lq_in", "sem_in", "v_guide"))
    delta, n = 0.01, 2

    def bc(v):
        return v.view(-1, 1, 1, 1)

    def rollout(net, use_r):
        with torch.no_grad():
            t_m = torch.maximum(t - delta, r)
            z = z_t - bc(t - t_m) * v_g  # teacher-guided warm start
            disp = torch.zeros_like(z)
            for k in range(n):
                tk, tk1 = t_m + (r - t_m) * k / n, t_m + (r - t_m) * (k + 1) / n
                f = net(z, tk, lq_in, sem_in, r=tk1) if use_r else net(z, tk, lq_in, sem_in)
                disp = disp + bc(tk - tk1) * f
                z = z - bc(tk - tk1) * f
        return disp

    def expected(disp):
        u = student(z_t, t, lq_in, sem_in, r=r)
        base = ((student(z_t, t, lq_in, sem_in, r=t) - v_g) ** 2).mean()
        gap = t - r
        near = gap < delta
        c_l = torch.where(near, torch.ones_like(gap), gap / delta)
        c_r = torch.where(near, 1 / gap, torch.full_like(gap, 1 / delta))
        corr = (bc(c_l) * u.detach() - bc(c_r) * disp - v_g).clamp(-1, 1)
        target = (u.detach() - corr).detach()
        cons = ((u - target) ** 2).mean()
        return base + 1.0 * cons, base, cons

    want, base_want, cons_want = expected(rollout(student, True))
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-4)
    assert st["base_loss"] == pytest.approx(float(base_want.detach()), rel=1e-4, abs=1e-7)  # base on r = t
    assert st["consistency_loss"] == pytest.approx(float(cons_want.detach()), rel=1e-4, abs=1e-7)
    with_teacher = expected(rollout(teacher, False))[2]
    assert abs(float(with_teacher.detach()) - float(cons_want.detach())) > 1e-3 * float(cons_want.detach())  # the check can tell a teacher roll-out apart
    # gradients flow only through u and the base prediction (the target is stop-gradient)
    p = student.blocks[0].attn.qkv.weight
    (g_got,) = torch.autograd.grad(loss, p)
    (g_want,) = torch.autograd.grad(want, p)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-3)


# --- docs/method.md s1 / s10.10: degradation order ----------------------------------------------------------------------

def _spy_ops(monkeypatch):
    from vosr.degrade import ops

    log = []

    def wrap(name):
        real = getattr(ops, name)

        def spy(*args, **kwargs):
            out = real(*args, **kwargs)
            log.append({"op": name, "args": args, "kwargs": kwargs, "in_shape": tuple(args[0].shape),
                        "out_shape": tuple(out.shape), "in": args[0].clone()})
            return out

        monkeypatch.setattr(ops, name, spy)

    for name in ("filter2d", "resize", "gaussian_noise", "poisson_noise", "jpeg", "quantize8"):
        wrap(name)
    return log


@pytest.mark.parametrize("final_order,blur2", [("resize_sinc_then_jpeg", True), ("jpeg_then_resize_sinc", False)])
def test_degradation_order_and_sizes(monkeypatch, final_order, blur2):
    from vosr.degrade import realesrgan
    from vosr.degrade.kernels import build_kernel

    rc = _cfg().degrade.realesrgan
    p = realesrgan.sample_params(torch.Generator().manual_seed(0), rc)
    p.update(final_order=final_order, blur2=blur2,
             resize1={"direction": "down", "factor": 0.5, "mode": "bilinear"},
             resize2={"direction": "up", "factor": 1.125, "mode": "area"},
             noise1={"type": "gaussian", "sigma": 10.0, "gray": False},
             noise2={"type": "poisson", "scale": 1.0, "gray": True},
             final_sinc={"family": "sinc", "size": 9, "omega_c": 2.0}, final_resize_mode="bicubic",
             resize_back_mode="bicubic")
    hr = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    log = _spy_ops(monkeypatch)
    lr = realesrgan.apply(hr, p, torch.Generator().manual_seed(2), rc, 4, True)
    ops_seq = [e["op"] for e in log]
    final = ["resize", "filter2d", "jpeg"] if final_order == "resize_sinc_then_jpeg" else ["jpeg", "resize",
                                                                                         "filter2d"]
    want = (["filter2d", "resize", "gaussian_noise", "jpeg"] + (["filter2d"] if blur2 else [])
            + ["resize", "poisson_noise"] + final + ["resize", "quantize8"])
    assert ops_seq == want
    assert torch.equal(log[0]["in"], hr)  # stage 1 blurs the GT itself: no USM sharpening anywhere
    torch.testing.assert_close(log[0]["args"][1].double(), build_kernel(p["k1"], 21))
    assert log[1]["out_shape"][-2:] == (32, 32)  # stage-1 factor 0.5
    assert log[2]["args"][1] == pytest.approx(10.0 / 255)  # sigma in 8-bit levels
    i2 = 5 if blur2 else 4
    if blur2:
        torch.testing.assert_close(log[4]["args"][1].double(), build_kernel(p["k2"], 21))
    assert log[i2]["out_shape"][-2:] == (18, 18)  # (ori / 4) * s2 = 16 * 1.125
    fin = log[i2 + 2:i2 + 5]
    sinc = next(e for e in fin if e["op"] == "filter2d")
    torch.testing.assert_close(sinc["args"][1].double(), build_kernel(p["final_sinc"], 21))
    assert sinc["in_shape"][-2:] == (16, 16)  # sinc after the resize to ori / 4
    for e in log:
        if e["op"] == "jpeg":
            assert float(e["in"].min()) >= 0 and float(e["in"].max()) <= 1  # clamped before JPEG
    back = log[-2]
    assert back["out_shape"][-2:] == (64, 64) and back["args"][1] == "bicubic"  # resize back to HR size
    assert lr.shape == hr.shape and torch.equal(lr * 255, (lr * 255).round())  # 8-bit last


def test_blur_is_reflect_padded_correlation_with_the_padded_kernel():
    """Real-ESRGAN filter2D: F.pad(reflect, 21 // 2) then conv2d (correlation) with the 21x21 zero-padded kernel."""
    from vosr.degrade.ops import filter2d

    g = torch.Generator().manual_seed(17)
    img = torch.rand(1, 3, 40, 48, generator=g)
    small = torch.rand(7, 7, generator=g, dtype=torch.float64)  # asymmetric: correlation != convolution
    k = F.pad(small / small.sum(), (7, 7, 7, 7))
    want = F.conv2d(F.pad(img.double(), (10, 10, 10, 10), mode="reflect").view(3, 1, 60, 68), k[None, None])
    got = filter2d(img, k)
    assert got.shape == img.shape
    torch.testing.assert_close(got.double(), want.view(1, 3, 40, 48), atol=2e-6, rtol=0)
