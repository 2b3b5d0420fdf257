"""Checkpoint folders (safetensors + JSON, no pickle) and the EMA helper."""

from __future__ import annotations

import json

import pytest
import torch

from jobkit.config import config_from_dict
from vosr.checkpoint import CheckpointError, load_checkpoint, load_train_state, read_meta, save_checkpoint
from vosr.distill import student_from_teacher
from vosr.ema import EMA
from vosr.model import build_dit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained_pair(student=False):
    """A tiny model after a couple of optimiser steps, with its EMA and optimizer."""
    cfg = config_from_dict({"preset": "tiny"}, ["flow.guidance_scale=-0.5"])
    torch.manual_seed(0)
    model = build_dit(cfg)
    if student:
        model = student_from_teacher(model, cfg)
    ema = EMA(model, decay=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    z, lq, sem = torch.randn(2, 48, 8, 8), torch.randn(2, 48, 8, 8), torch.randn(2, 64, 64)
    for _ in range(2):
        out = model(z, torch.rand(2), lq, sem, r=torch.zeros(2) if student else None)
        loss = (out - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    return cfg, model, ema, opt, (z, lq, sem)


@pytest.mark.parametrize("student", [False, True])
def test_round_trip_identical_outputs(tmp_path, student):
    cfg, model, ema, opt, (z, lq, sem) = trained_pair(student)
    extra = {"autoencoder": {"name": "pixel", "weights_sha256": None}, "step": 2}
    rng = torch.get_rng_state()
    save_checkpoint(str(tmp_path), cfg, model, ema=ema, extra=extra,
                    train_state={"optimizer": opt.state_dict(), "step": 2, "rng": rng, "pair": (1, "a")})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "ema_model.safetensors", "model.safetensors", "train_state.json",
                     "train_state.safetensors"]
    meta = read_meta(str(tmp_path))
    assert meta["preset"] == "tiny" and meta["is_student"] is student and meta["extra"] == extra
    assert meta["config"]["flow"]["guidance_scale"] == -0.5

    t = torch.tensor([0.3, 0.8])
    r = torch.tensor([0.1, 0.0]) if student else None
    loaded, cfg2, meta2 = load_checkpoint(str(tmp_path), use_ema=False)
    assert meta2["weights"] == "model.safetensors" and cfg2.flow.guidance_scale == -0.5
    assert loaded.is_student is student and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(z, t, lq, sem, r=r), model.eval()(z, t, lq, sem, r=r))
    loaded_ema, _, meta3 = load_checkpoint(str(tmp_path))  # EMA by default
    assert meta3["weights"] == "ema_model.safetensors"
    with torch.no_grad():
        assert torch.equal(loaded_ema(z, t, lq, sem, r=r), ema.module(z, t, lq, sem, r=r))
        assert not torch.equal(loaded_ema(z, t, lq, sem, r=r), loaded(z, t, lq, sem, r=r))

    state = load_train_state(str(tmp_path))
    assert state["step"] == 2 and torch.equal(state["rng"], rng) and state["pair"] == (1, "a")
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    opt2.load_state_dict(state["optimizer"])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"][0]["betas"] == s2["param_groups"][0]["betas"]
    assert set(s1["state"]) == set(s2["state"])  # integer keys survive JSON
    for k in s1["state"]:
        assert torch.equal(s1["state"][k]["exp_avg"], s2["state"][k]["exp_avg"])


def test_no_pickle_in_checkpoint(tmp_path):
    cfg, model, ema, opt, _ = trained_pair()
    save_checkpoint(str(tmp_path), cfg, model, ema=ema, train_state={"optimizer": opt.state_dict()})
    for p in tmp_path.iterdir():
        head = p.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"\x80\x02" and not p.read_bytes().startswith(b"PK")
    json.loads((tmp_path / "config.json").read_text())
    json.loads((tmp_path / "train_state.json").read_text())


def test_missing_or_foreign_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a VOSR checkpoint"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(str(tmp_path))


def test_mismatched_weights_error(tmp_path):
    cfg, model, _, _, _ = trained_pair()
    save_checkpoint(str(tmp_path), cfg, model)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["model"]["depth"] = 5
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(str(tmp_path))


def test_without_ema_falls_back_to_model_weights(tmp_path):
    cfg, model, _, _, (z, lq, sem) = trained_pair()
    save_checkpoint(str(tmp_path), cfg, model)
    loaded, _, meta = load_checkpoint(str(tmp_path), use_ema=True)
    assert meta["weights"] == "model.safetensors"
    assert load_train_state(str(tmp_path)) is None


def test_reload_for_another_training_grid_rebuilds_rope(tmp_path):
    cfg, model, _, _, (z, lq, sem) = trained_pair()
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.05)
    save_checkpoint(str(tmp_path), cfg, model)
    base, _, _ = load_checkpoint(str(tmp_path))
    assert base.train_grid == 8
    big, cfg_big, _ = load_checkpoint(str(tmp_path), train_resolution=128)  # progressive 64 -> 128 px stage
    assert big.train_grid == 16 and cfg_big.data.resolution == 128
    assert not any("rope" in k or "freqs" in k for k in big.state_dict())
    z16, lq16 = torch.randn(1, 48, 32, 32), torch.randn(1, 48, 32, 32)
    t = torch.tensor([0.5])
    with torch.no_grad():
        # same weights, but on a 16x16 token grid the old model interpolates positions, the new one uses integers
        assert not torch.allclose(base(z16, t, lq16, sem[:1]), big(z16, t, lq16, sem[:1]))
        big.set_train_grid(8)
        assert torch.equal(base(z16, t, lq16, sem[:1]), big(z16, t, lq16, sem[:1]))


def test_ema_update_rule():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    ema = EMA(lin, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    torch.testing.assert_close(ema.module.weight, 0.9 * before["weight"] + 0.1 * lin.weight)
    torch.testing.assert_close(ema.module.bias, before["bias"])
    assert not ema.module.weight.requires_grad
    ema.reset(lin)
    torch.testing.assert_close(ema.module.weight, lin.weight)
    with pytest.raises(ValueError):
        EMA(lin, decay=1.5)
