"""The training pieces that need no Ray: LR schedule, batch split, hold-out split, resumable optimiser state,
progressive-stage initialisation, validation grid."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_lr_is_constant_after_linear_warmup():
    from training.loop import lr_at

    assert [lr_at(s, 1e-4, 0) for s in (1, 2, 1000)] == [1e-4] * 3
    assert [lr_at(s, 1e-4, 4) for s in (1, 2, 4, 5, 99)] == pytest.approx([2.5e-5, 5e-5, 1e-4, 1e-4, 1e-4])


def test_global_batch_is_split_across_workers_and_accumulation():
    from training.loop import local_micro_batch

    assert local_micro_batch(256, 8, 1) == 32
    assert local_micro_batch(1024, 8, 2) == 64
    with pytest.raises(ValueError, match="divisible"):
        local_micro_batch(10, 4, 1)


def test_holdout_split_is_by_id_stable_and_near_the_fraction():
    from training.data import _SplitFilter, is_holdout

    ids = [f"img{i:05d}" for i in range(4000)]
    frac = np.mean([is_holdout(i, 0.1) for i in ids])
    assert 0.08 < frac < 0.12
    assert [is_holdout(i, 0.1) for i in ids[:50]] == [is_holdout(i, 0.1) for i in ids[:50]]
    assert not any(is_holdout(i, 0.0) for i in ids[:200])
    table = pa.table({"id": [i for i in ids[:200] for _ in range(2)], "variant": [0, 1] * 200})
    train = _SplitFilter(0.25, keep_holdout=False)(table)
    val = _SplitFilter(0.25, keep_holdout=True, first_variant_only=True)(table)
    assert set(train.column("id").to_pylist()).isdisjoint(val.column("id").to_pylist())
    assert train.num_rows % 2 == 0 and val.num_rows * 2 + train.num_rows == 400  # both variants stay together
    assert set(val.column("variant").to_pylist()) == {0}


def _tiny(*overrides: str):
    from jobkit.config import load_config

    return load_config(ROOT / "configs/train/tiny.yaml", list(overrides))


def _batch(cfg, n: int, seed: int):
    from vosr.model import model_dims

    d = model_dims(cfg)
    g = torch.Generator().manual_seed(seed)
    side = cfg.data.resolution // d["downsample"]
    shape = (n, d["latent_channels"], side, side)
    return (torch.randn(shape, generator=g), torch.randn(shape, generator=g),
            torch.randn(n, d["sem_tokens"], d["sem_dim"], generator=g))


def test_saved_optimizer_and_rng_state_resume_the_same_trajectory(tmp_path):
    from training.train_state import build_train_state, restore_train_state
    from vosr.checkpoint import load_train_state, save_checkpoint
    from vosr.flow import training_loss
    from vosr.model import build_dit
    from vosr.seeding import generator

    cfg = _tiny()
    torch.manual_seed(0)
    model = build_dit(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)

    def step(m, o, k):
        hq, lq, sem = _batch(cfg, 4, k)
        loss, _ = training_loss(m, hq, lq, sem, cfg.flow, generator(100 + k))
        o.zero_grad()
        loss.backward()
        o.step()

    for k in range(3):
        step(model, opt, k)
    save_checkpoint(str(tmp_path), cfg, model, ema=model,
                    train_state=build_train_state(opt, {"step": 3, "epoch": 1, "batch_in_epoch": 2, "samples": 12}))
    for k in range(3, 5):
        step(model, opt, k)

    clone = build_dit(cfg)
    from safetensors.torch import load_file

    clone.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    opt2 = torch.optim.AdamW(clone.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    position = restore_train_state(load_train_state(str(tmp_path)), opt2)
    assert position == {"step": 3, "epoch": 1, "batch_in_epoch": 2, "samples": 12}
    for k in range(3, 5):
        step(clone, opt2, k)
    for (name, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming"


def test_progressive_stage_loads_weights_and_rebuilds_rope_for_the_new_grid(tmp_path):
    from training.objectives import PretrainObjective
    from vosr.checkpoint import save_checkpoint
    from vosr.model import build_dit

    low = _tiny("data.resolution=64")
    torch.manual_seed(1)
    src = build_dit(low)
    torch.nn.init.normal_(src.final_layer.linear.weight, std=0.02)  # a non-trivial output
    save_checkpoint(str(tmp_path / "stage1"), low, src, ema=src)

    high = _tiny("data.resolution=128")
    objective = PretrainObjective(high, torch.device("cpu"))
    model = objective.build_model()
    info = objective.init_from(model, str(tmp_path / "stage1"))
    assert info["init_from_resolution"] == 64 and model.train_grid == 2 * src.train_grid == info["train_grid"]
    for (name, a), b in zip(src.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    hq, lq, sem = _batch(high, 2, 3)
    with torch.no_grad():
        v = model(hq, torch.full((2,), 0.5), lq, sem)
    assert v.shape == hq.shape and v.abs().mean() > 0

    other = _tiny("model.depth=2")
    with pytest.raises(ValueError, match="architecture mismatch"):
        PretrainObjective(other, torch.device("cpu")).init_from(build_dit(other), str(tmp_path / "stage1"))


def test_validation_grid_is_a_png_with_one_row_per_image():
    from PIL import Image

    from training.validation import image_grid, to_uint8

    tiles = [[to_uint8(torch.rand(3, 16, 16) * 2 - 1) for _ in range(3)] for _ in range(2)]
    img = Image.open(io.BytesIO(image_grid(tiles, pad=2)))
    assert img.size == (3 * 18 + 2, 2 * 18 + 2)
    assert to_uint8(torch.ones(3, 2, 2)).max() == 255 and to_uint8(-torch.ones(3, 2, 2)).max() == 0


def test_resume_takes_the_latest_complete_checkpoint_and_prunes_unregistered_ones(tmp_path):
    """training/resume.py: a folder is complete when every file of its manifest is there with its size; the
    newest complete one wins over an older checkpoint Ray registered; after the run, folders Ray never registered
    are removed unless they are among the newest `keep` complete ones."""
    import ray.train

    from training.resume import choose, complete_checkpoints, prune_untracked, write_manifest

    run = tmp_path / "run"

    def folder(step: int, manifest: bool = True, truncate: bool = False) -> Path:
        d = run / f"checkpoint_{step:08d}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"w" * 100)
        (d / "config.json").write_text("{}")
        if manifest:
            write_manifest(d)
        if truncate:  # an upload cut short: the manifest arrived, a weight file did not finish
            (d / "model.safetensors").write_bytes(b"w" * 10)
        return d

    folder(2), folder(4), folder(6, truncate=True), folder(8, manifest=False)
    # a copy caught mid-way through the manifest itself (seen by a restart reading storage during an upload)
    (folder(12) / "_vosr_files.json").write_text('{"files": {"model.safet')
    (folder(14) / "_vosr_files.json").write_text("")
    assert [s for s, _ in complete_checkpoints(str(run))] == [2, 4]
    for step in (12, 14):
        shutil.rmtree(run / f"checkpoint_{step:08d}")
    assert choose(str(run), "", None) == (4, str(run / "checkpoint_00000004"), "storage")
    registered = ray.train.Checkpoint(str(run / "checkpoint_00000002"))
    assert choose(str(run), "", registered)[2] == "storage"  # Ray knows 2, storage has a complete 4
    assert choose(str(run), "", ray.train.Checkpoint(str(run / "checkpoint_00000004")))[2] == "ray"
    assert choose(str(tmp_path / "empty"), "", None) is None
    folder(10)
    deleted = prune_untracked(str(run), "", tracked={"checkpoint_00000002", "checkpoint_00000010"}, keep=2,
                              final_step=10)
    assert deleted == ["checkpoint_00000006", "checkpoint_00000008"]  # 4 is among the newest complete two
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_00000002", "checkpoint_00000004",
                                                     "checkpoint_00000010"]


def test_optimizer_state_format_must_match_the_strategy():
    from training.train_state import FULL_OPTIMIZER, build_train_state, check_optimizer_format

    model = torch.nn.Linear(2, 2)
    ddp = build_train_state(torch.optim.AdamW(model.parameters()), {"step": 1})
    fsdp = build_train_state(None, {"step": 1}, full_optimizer={"state": {}, "param_groups": []})
    assert FULL_OPTIMIZER in fsdp and "optimizer" not in fsdp
    check_optimizer_format(ddp, fsdp=False)
    with pytest.raises(ValueError, match="strategy=ddp"):
        check_optimizer_format(ddp, fsdp=True)
    with pytest.raises(ValueError, match="strategy=fsdp"):
        check_optimizer_format({**fsdp, FULL_OPTIMIZER: {"state": {"w": {}}}}, fsdp=False)
