"""Flow matching, partial conditioning, guidance and samplers against docs/method.md s5-6 / s10.2-5."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jobkit.config import config_from_dict
from vosr import flow
from vosr.model import build_dit

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed=0, **model):
    torch.manual_seed(seed)
    m = build_dit(config_from_dict({"preset": "tiny", "model": model}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # give the zero-initialised output layer weights so branches differ
        for p in m.final_layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def batch(b=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 48, h, w, generator=g), torch.randn(b, 48, h, w, generator=g),
            torch.randn(b, 64, 64, generator=g))


# --- training draws -------------------------------------------------------------------------------------------------

def test_flow_convention_and_loss():
    cfg = config_from_dict({"preset": "tiny"})
    hq, lq, sem = batch(4)
    d = flow.training_inputs(hq, lq, sem, cfg.flow, torch.Generator().manual_seed(3))
    t = d["t"].view(-1, 1, 1, 1)
    torch.testing.assert_close(d["z_t"], (1 - t) * hq + t * d["eps"])
    torch.testing.assert_close(d["target"], d["eps"] - hq)
    assert ((d["t"] >= 0) & (d["t"] < 1)).all()
    m = tiny_model()
    loss, stats = flow.training_loss(m, hq, lq, sem, cfg.flow, torch.Generator().manual_seed(3))
    pred = m(d["z_t"], d["t"], d["lq_in"], d["sem_in"])  # same seed -> same draws
    torch.testing.assert_close(loss, ((pred - d["target"]) ** 2).mean())
    assert stats["loss"] == pytest.approx(float(loss.detach()))


def test_partial_branch_mask_rate_and_one_w_per_batch():
    cfg = config_from_dict({"preset": "tiny"})
    n = 4000
    g = torch.Generator().manual_seed(0)
    hq = torch.randn(n, 1, 1, 1, generator=g)
    lq = torch.rand(n, 1, 1, 1, generator=g) + 0.5  # positive, so w*lq is distinguishable
    sem = torch.randn(n, 3, 2, generator=g)
    d = flow.training_inputs(hq, lq, sem, cfg.flow, g)
    weak = d["weak"]
    rate = float(weak.float().mean())
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
    w = d["w"]
    assert 0.05 <= w <= 0.25
    # weak samples: clean (unaugmented) lq scaled by the ONE batch w, raw semantic tokens zeroed
    torch.testing.assert_close(d["lq_in"][weak], w * lq[weak], atol=0, rtol=0)
    assert torch.count_nonzero(d["sem_in"][weak]) == 0
    # the others: noise-augmented lq and the full tokens
    torch.testing.assert_close(d["sem_in"][~weak], sem[~weak], atol=0, rtol=0)
    assert not torch.allclose(d["lq_in"][~weak], lq[~weak])
    # w is uniform on [0.05, 0.25] across batches
    ws = [flow.training_inputs(hq[:4], lq[:4], sem[:4], cfg.flow, g)["w"] for _ in range(400)]
    assert min(ws) >= 0.05 and max(ws) <= 0.25
    assert abs(np.mean(ws) - 0.15) < 0.01 and min(ws) < 0.07 and max(ws) > 0.23


def test_lr_noise_augmentation_distribution():
    cfg = config_from_dict({"preset": "tiny"})
    n = 20000
    lq = torch.zeros(n, 2, 2, 2)
    noised, a = flow.lr_noise_augment(lq, cfg.flow, torch.Generator().manual_seed(5))
    med = float(a.median())
    assert abs(med - 1 / (1 + math.exp(-5))) < 0.002  # median sigmoid(5) = 0.9933
    assert abs(float(a.quantile(0.05)) - 0.966) < 0.004
    # spherical mix: with lq = 0 the result is sqrt(1 - a^2) * eps'
    std_per = noised.flatten(1).std(dim=1)
    expected = torch.sqrt(1 - a**2)
    assert abs(float((noised.flatten(1) ** 2).mean(1).mean()) - float((expected**2).mean())) < 0.003
    assert float(std_per.median()) == pytest.approx(float(expected.median()), rel=0.25)
    lq1 = torch.ones(n, 1, 1, 1) * 2.0
    noised1, a1 = flow.lr_noise_augment(lq1, cfg.flow, torch.Generator().manual_seed(6))
    resid = (noised1.flatten() - a1 * 2.0) / torch.sqrt(1 - a1**2)
    assert abs(float(resid.mean())) < 0.03 and abs(float(resid.std()) - 1) < 0.03


# --- guidance ---------------------------------------------------------------------------------------------------------

def test_guidance_endpoints_are_exact_branches():
    m = tiny_model()
    z, lq, sem = batch(2)
    t = 0.6
    v_full = m(z, torch.full((2,), t), lq, sem)
    v_part = m(z, torch.full((2,), t), 0.15 * lq, torch.zeros_like(sem))
    with torch.no_grad():
        v1 = flow.multistep_velocity_fn(m, lq, sem, scale=1.0, weak_strength=0.15)(z, t, 0.5)
        v0 = flow.multistep_velocity_fn(m, lq, sem, scale=0.0, weak_strength=0.15)(z, t, 0.5)
        vm = flow.multistep_velocity_fn(m, lq, sem, scale=-0.5, weak_strength=0.15)(z, t, 0.5)
    torch.testing.assert_close(v1, v_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v0, v_part, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vm, 1.5 * v_part - 0.5 * v_full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v_full, v_part, atol=1e-3)
    # weak strength is a working option
    with torch.no_grad():
        v0b = flow.multistep_velocity_fn(m, lq, sem, scale=0.0, weak_strength=0.05)(z, t, 0.5)
    assert not torch.allclose(v0, v0b, atol=1e-4)
    # exact combination of the branches of one doubled batch
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(flow.guide(a, b, 1.0), b) and torch.equal(flow.guide(a, b, 0.0), a)


class CountingModel(torch.nn.Module):
    """Wraps a real model and records the batch size of each call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []
        self.is_student = inner.is_student

    def forward(self, z, t, lq, sem, r=None):
        self.calls.append((z.shape[0], None if r is None else r.clone(), t.clone()))
        return self.inner(z, t, lq, sem, r=r)


def test_multistep_uses_one_doubled_batch_per_step():
    m = CountingModel(tiny_model())
    z, lq, sem = batch(2)
    out = flow.sample_multistep(m, lq, sem, steps=4, guidance_scale=0.5, noise=z)
    assert out.shape == z.shape
    assert [c[0] for c in m.calls] == [4] * 4
    assert [float(c[2][0]) for c in m.calls] == pytest.approx([1.0, 0.75, 0.5, 0.25])


# --- samplers ---------------------------------------------------------------------------------------------------------

def test_timestep_schedules():
    torch.testing.assert_close(flow.timesteps(4, "linear"), torch.tensor([1, 0.75, 0.5, 0.25, 0.0],
                                                                         dtype=torch.float64))
    cos = flow.timesteps(4, "cosine")
    torch.testing.assert_close(cos, torch.cos(torch.linspace(0, math.pi / 2, 5, dtype=torch.float64)),
                               atol=1e-12, rtol=0)
    assert float(cos[0]) == 1.0 and float(cos[-1]) == 0.0
    with pytest.raises(ValueError, match="known schedules"):
        flow.timesteps(4, "karras")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_euler_with_exact_velocity_recovers_data(schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)

    def exact(z, t, t_next):  # the straight path's velocity eps - x0, read off the current point
        return (z - x0) / t

    out = flow.euler_sample(exact, eps, flow.timesteps(7, schedule))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_fewstep_sampler_one_step_is_z1_minus_f():
    torch.manual_seed(0)
    student = build_dit(config_from_dict({"preset": "tiny"}), student=True)
    with torch.no_grad():
        for p in student.final_layer.parameters():
            p.normal_(0, 0.05)
        for p in student.r_embedder.parameters():
            p.normal_(0, 0.05)
    z, lq, sem = batch(2)
    one = flow.sample_fewstep(student, lq, sem, steps=1, noise=z)
    with torch.no_grad():
        ref = z - student(z, torch.ones(2), lq, sem, r=torch.zeros(2))
    torch.testing.assert_close(one, ref)
    counting = CountingModel(student)
    flow.sample_fewstep(counting, lq, sem, steps=2, noise=z)
    assert [float(c[1][0]) for c in counting.calls] == [0.5, 0.0]  # r = t_next
    with pytest.raises(ValueError, match="student"):
        flow.sample_fewstep(tiny_model(), lq, sem, steps=1, noise=z)


# --- end to end: a tiny model overfits one real image pair --------------------------------------------------------

def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(4.0 / float(((a.clamp(-1, 1) - b) ** 2).mean()))  # images in [-1, 1]


def test_tiny_model_overfits_one_pair():
    from vosr.encoders import build_autoencoder, build_semantic_encoder

    torch.manual_seed(0)
    s = 32
    # patch 1: with the pixel codec's 48 channels a p=2 token holds 192 values, more than a narrow D carries
    cfg = config_from_dict({"preset": "tiny", "data": {"resolution": s},
                            "model": {"hidden_size": 64, "depth": 2, "num_heads": 2, "patch_size": 1}})
    img = Image.open(ROOT / "assets" / "photos" / "mpl_grace_hopper.jpg").convert("RGB")
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(48, int(48 * x.shape[3] / x.shape[2])), mode="area")[:, :, 8:40, 8:40]
    lr_up = F.interpolate(F.interpolate(x, scale_factor=0.25, mode="bicubic", antialias=True), size=(s, s),
                          mode="bicubic").clamp(0, 1)
    ae, sem_enc = build_autoencoder(cfg.autoencoder), build_semantic_encoder(cfg.semantic)
    hq, lq, sem = ae.encode(x * 2 - 1), ae.encode(lr_up * 2 - 1), sem_enc(lr_up)
    baseline = _psnr(ae.decode(lq), x * 2 - 1)  # "bicubic": the upsampled LR itself

    model = build_dit(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    b = 8
    for _ in range(160):
        loss, _ = flow.training_loss(model, hq.expand(b, -1, -1, -1), lq.expand(b, -1, -1, -1),
                                     sem.expand(b, -1, -1), cfg.flow, g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    out = flow.sample_multistep(model, lq, sem, steps=25, guidance_scale=1.0,
                                generator=torch.Generator().manual_seed(1))
    sr = _psnr(ae.decode(out), x * 2 - 1)
    assert sr > baseline + 3.0, (sr, baseline)


def test_cached_semantic_keys_values_give_the_same_samples():
    m = tiny_model()
    z, lq, sem = batch(2)
    with torch.no_grad():
        plain = flow.euler_sample(flow.multistep_velocity_fn(m, lq, sem, 0.5, 0.15), z, flow.timesteps(3))
        cached = flow.euler_sample(flow.multistep_velocity_fn(m, lq, sem, 0.5, 0.15, cache_semantic=True), z,
                                   flow.timesteps(3))
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow.sample_multistep(m, lq, sem, steps=3, noise=z), plain, atol=1e-5, rtol=1e-5)
