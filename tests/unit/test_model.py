"""The DiT backbone against docs/method.md s4 / s10.7: sizes, structure, RoPE, time embedding, conditioning paths."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from jobkit.cli import main as cli_main
from jobkit.config import config_from_dict
from vosr.model import build_dit, count_parameters
from vosr.model.layers import timestep_sinusoid
from vosr.model.rope import axis_positions, rope_tables, rotate_half

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(**model):
    return config_from_dict({"preset": "tiny", "model": model} if model else {"preset": "tiny"})


def tiny_inputs(b=2, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 48, h, w, generator=g), torch.rand(b, generator=g), torch.randn(b, 48, h, w, generator=g),
            torch.randn(b, 64, 64, generator=g))


def with_output_layer(model, seed=1):
    """The final layer is zero at init; give it weights so outputs depend on the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# --- sizes (docs/method.md s4 table) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,total,extra", [("vosr-0.5b", 485.6e6, 1.31e6), ("vosr-1.4b", 1393.9e6, 2.76e6)])
def test_parameter_counts_match_method_table(preset, total, extra):
    counts = count_parameters(config_from_dict({"preset": preset}))
    assert abs(counts["dit_params"] - total) / total < 0.005
    assert abs(counts["student_extra_params"] - extra) / extra < 0.02
    assert counts["student_params"] == counts["dit_params"] + counts["student_extra_params"]
    assert counts["train_grid"] == 32 and counts["head_dim"] == 64


def test_params_cli_prints_json():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(["params", "--preset", "vosr-0.5b"]) == 0
    out = json.loads(buf.getvalue())
    assert out["preset"] == "vosr-0.5b" and round(out["dit_params"] / 1e6, 1) == 485.6


@pytest.mark.parametrize("preset,hidden", [("vosr-0.5b", 2730), ("vosr-1.4b", 4096)])
def test_swiglu_width_is_int_8d_over_3(preset, hidden):
    m = build_dit(config_from_dict({"preset": preset}), device="meta")
    d = m.hidden_size
    assert m.mlp_hidden == int(8 * d / 3) == hidden
    mlp = m.blocks[0].mlp
    assert tuple(mlp.w12.weight.shape) == (2 * hidden, d) and tuple(mlp.w3.weight.shape) == (d, hidden)
    assert mlp.w12.bias is not None and mlp.w3.bias is not None


# --- structure ----------------------------------------------------------------------------------------------------

def test_adaln_single_structure():
    m = build_dit(tiny_cfg())
    d = m.hidden_size
    six_d = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and mod.out_features == 6 * d]
    assert six_d == ["t_block.1"]  # one shared projection, no per-block adaLN MLP
    assert tuple(m.t_block[1].weight.shape) == (6 * d, d)
    for blk in m.blocks:
        assert tuple(blk.scale_shift_table.shape) == (6, d)
    tables = torch.stack([blk.scale_shift_table.detach() for blk in m.blocks])
    assert not torch.allclose(tables[0], tables[1])  # per-block, random N(0,1)/sqrt(D)
    assert 0.5 < float(tables.std() * math.sqrt(d)) < 1.5
    # the chunks are used in the order shift_msa, scale_msa, gate_msa, ...: zero gates switch the branches off
    x = torch.randn(2, 64, d)
    ctx = torch.randn(2, 8, d)
    rope = m.rope(8, 8, x.device)
    blk = m.blocks[0]
    c0 = torch.zeros(2, 6 * d)
    with torch.no_grad():
        blk.scale_shift_table.zero_()
        for p in blk.cross_attn.proj.parameters():
            p.zero_()
        assert torch.equal(blk(x, c0, ctx, rope), x)  # gates (chunks 2 and 5) zero -> identity
        c0[:, 2 * d:3 * d] = 1.0  # gate_msa only
        assert not torch.equal(blk(x, c0, ctx, rope), x)


def test_zero_init_final_layer_gives_zero_output():
    m = build_dit(tiny_cfg())
    z, t, lq, sem = tiny_inputs()
    v = m(z, t, lq, sem)
    assert v.shape == z.shape and torch.count_nonzero(v) == 0
    assert torch.count_nonzero(m.final_layer.adaLN_modulation[1].weight) == 0


def test_initialisation_rules():
    torch.manual_seed(0)
    m = build_dit(config_from_dict({"preset": "tiny", "model": {"hidden_size": 256, "num_heads": 4}}))
    # time MLPs and t_block: N(0, 0.02); linear biases zero; xavier elsewhere
    for w in (m.t_embedder.mlp[0].weight, m.t_embedder.mlp[2].weight, m.t_block[1].weight):
        assert abs(float(w.detach().std()) - 0.02) < 0.003
    w = m.blocks[0].attn.proj.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    wmax = float(w.detach().abs().max())
    assert 0.9 * bound < wmax <= bound
    assert torch.count_nonzero(m.blocks[0].attn.qkv.bias) == 0
    assert torch.count_nonzero(m.x_embedder.bias) == 0


def test_lr_latent_is_concatenated_first():
    m = with_output_layer(build_dit(tiny_cfg()))
    c = m.latent_channels
    assert m.x_embedder.in_channels == 2 * c
    with torch.no_grad():
        m.x_embedder.weight[:, c:] = 0  # kill the second half of the input channels
    z, t, lq, sem = tiny_inputs()
    v1 = m(z, t, lq, sem)
    v2 = m(torch.randn_like(z), t, lq, sem)
    assert torch.equal(v1, v2)  # z_t sits in the second half...
    assert not torch.allclose(v1, m(z, t, torch.randn_like(lq), sem))  # ...and the LR latent in the first


def test_student_requires_and_teacher_rejects_r():
    teacher = build_dit(tiny_cfg())
    z, t, lq, sem = tiny_inputs()
    with pytest.raises(ValueError, match="teacher"):
        teacher(z, t, lq, sem, r=t)
    student = build_dit(tiny_cfg(), student=True)
    assert student.is_student and not teacher.is_student
    assert student(z, t, lq, sem, r=t * 0.5).shape == z.shape


# --- time embedding (raw t) -----------------------------------------------------------------------------------------

def test_timestep_embedding_uses_raw_t():
    t = torch.tensor([0.0, 0.37, 1.0])
    emb = timestep_sinusoid(t, 256, 10000.0)
    expected = torch.zeros(3, 256)
    for i, tv in enumerate([0.0, 0.37, 1.0]):
        for k in range(128):
            f = math.exp(-math.log(10000.0) * k / 128)
            expected[i, k] = math.cos(tv * f)  # cos half first (DiT)
            expected[i, 128 + k] = math.sin(tv * f)
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=0)
    # the model's embedder consumes exactly this sinusoid of raw t (no x1000)
    m = build_dit(tiny_cfg())
    mlp = m.t_embedder.mlp
    torch.testing.assert_close(m.t_embedder(t), mlp(expected), atol=1e-6, rtol=1e-5)


# --- semantic projection -----------------------------------------------------------------------------------------

def test_zeroed_semantic_tokens_give_one_constant_learned_token():
    m = build_dit(tiny_cfg())
    proj = m.sem_proj
    with torch.no_grad():
        proj.norm.bias.copy_(torch.randn(proj.norm.bias.shape))
        proj.fc1.bias.copy_(torch.randn(proj.fc1.bias.shape) * 0.1)
    out = proj(torch.zeros(2, 64, m.sem_dim))
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=0, rtol=0)
    ref = proj.fc2(torch.nn.functional.gelu(proj.fc1(proj.norm.bias), approximate="tanh"))
    torch.testing.assert_close(out[0, 0], ref, atol=1e-6, rtol=1e-5)
    assert float(out.detach().abs().max()) > 0  # a learned token, not zero
    assert abs(proj.norm.eps - 1e-5) < 1e-12 and proj.norm.elementwise_affine
    assert proj.fc1.out_features == 3 * m.hidden_size and proj.fc2.out_features == m.hidden_size


# --- RoPE ----------------------------------------------------------------------------------------------------------

def test_rope_positions_frequencies_and_layout():
    assert torch.equal(axis_positions(32, 32), torch.arange(32, dtype=torch.float64))
    torch.testing.assert_close(axis_positions(64, 32), torch.arange(64, dtype=torch.float64) / 2)
    torch.testing.assert_close(axis_positions(20, 8), torch.arange(20, dtype=torch.float64) / 20 * 8)
    head_dim, g = 64, 32
    cos, sin = rope_tables(g, g, head_dim, (g, g))
    # hand-built: 16 frequencies per axis, each for an adjacent pair; rows first 32 channels, cols last 32
    freqs = [10000.0 ** (-2 * i / 32) for i in range(16)]
    for (row, col) in [(0, 0), (3, 5), (31, 17)]:
        tok = row * g + col
        for k in range(32):
            ang_r = row * freqs[k // 2]
            ang_c = col * freqs[k // 2]
            assert abs(float(cos[tok, k]) - math.cos(ang_r)) < 1e-5
            assert abs(float(sin[tok, 32 + k]) - math.sin(ang_c)) < 1e-5
    # rotate_half pairs adjacent channels: (x0, x1, x2, x3) -> (-x1, x0, -x3, x2)
    assert rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [-2.0, 1.0, -4.0, 3.0]


def test_rope_preserves_norm_and_relative_positions():
    m = build_dit(tiny_cfg())
    cos, sin = m.rope(8, 8, torch.device("cpu"))
    from vosr.model.rope import apply_rope

    q = torch.randn(1, 1, 64, m.head_dim)
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))
    # q.k after RoPE depends only on the offset: same vectors at (0,0)->(1,2) and (3,3)->(4,5)
    qv, kv = torch.randn(m.head_dim), torch.randn(m.head_dim)

    def dot(a, b):
        qa = apply_rope(qv[None], cos[a:a + 1], sin[a:a + 1])
        kb = apply_rope(kv[None], cos[b:b + 1], sin[b:b + 1])
        return float((qa * kb).sum())

    assert abs(dot(0 * 8 + 0, 1 * 8 + 2) - dot(3 * 8 + 3, 4 * 8 + 5)) < 1e-4


def test_model_runs_at_other_sizes_including_non_square():
    m = with_output_layer(build_dit(tiny_cfg()))
    assert m.train_grid == 8  # 64 px / (pixel codec 4 x patch 2)
    for h, w in [(16, 16), (24, 24), (12, 20), (16, 6)]:
        z, t, lq, sem = tiny_inputs(1, h, w)
        v = m(z, t, lq, sem)
        assert v.shape == z.shape and torch.isfinite(v).all()
    # unpatchify of a non-square grid: channel order (p, q, c) per token, tokens row-major
    with torch.no_grad():
        x = torch.arange(6 * 10 * 4 * 48, dtype=torch.float32).view(1, 60, 4 * 48)
        img = m.unpatchify(x, 6, 10)
    # token (row 2, col 7), sub-position (p=1, q=0), channel 5 sits at pixel (2*2+1, 7*2+0)
    tok = 2 * 10 + 7
    assert float(img[0, 5, 5, 14]) == float(x[0, tok, (1 * 2 + 0) * 48 + 5])


def test_rope_at_training_grid_uses_integer_positions_in_model():
    m = build_dit(tiny_cfg())
    cos, _ = m.rope(8, 8, torch.device("cpu"))
    ref, _ = rope_tables(8, 8, m.head_dim, (8, 8))
    assert torch.equal(cos, ref)
    cos16, _ = m.rope(16, 16, torch.device("cpu"))
    # interpolated: token row 2 of a 16-grid sits at position 1.0 of the 8-grid
    assert torch.allclose(cos16[2 * 16 + 0], ref[1 * 8 + 0], atol=1e-6)
    m.set_train_grid(16)
    cos16b, _ = m.rope(16, 16, torch.device("cpu"))
    assert torch.equal(cos16b, rope_tables(16, 16, m.head_dim, (16, 16))[0])


def test_latent_not_multiple_of_patch_raises():
    m = build_dit(tiny_cfg())
    z, t, lq, sem = tiny_inputs(1, 15, 16)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(z, t, lq, sem)
    z, t, lq, sem = tiny_inputs(1, 16, 16)
    with pytest.raises(ValueError, match="latent channels"):
        m(z[:, :4], t, lq[:, :4], sem)


def test_prepared_semantic_context_gives_the_same_velocity():
    m = with_output_layer(build_dit(tiny_cfg(), student=True))
    z, t, lq, sem = tiny_inputs(2, 8, 12)
    with torch.no_grad():
        ctx = m.prepare_semantic(sem)
        ref = m(z, t, lq, sem, r=t * 0.5)
        got = m(z, t, lq, ctx, r=t * 0.5)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert len(ctx.kv) == len(m.blocks)
    with pytest.raises(ValueError, match="prepared for batch"):
        m(z[:1], t[:1], lq[:1], ctx)
