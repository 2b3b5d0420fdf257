"""train.strategy=fsdp (FSDP2, training/fsdp.py) on real local Ray Train: 2 CPU workers over gloo, tiny preset.

One fit: a worker dies at step 3, FailureConfig restarts the group, it resumes from checkpoint 2 and finishes at 4.
The checkpoints hold the unsharded model, the EMA and the full optimizer state keyed by parameter name; the
AdamW step counter of 4 in the final checkpoint shows the resumed run continued the saved moments (a run whose
optimizer restarted at the resume would count 2).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # notice the failed worker sooner


def test_fsdp_checkpoints_full_state_and_resumes_the_optimizer(ray_local, photos, tmp_path):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from tests.helpers.train_data import make_feature_shards
    from training.pretrain import run
    from training.train_state import FULL_OPTIMIZER
    from vosr.checkpoint import load_checkpoint, load_train_state
    from vosr.config import load_config

    cfg = load_config(ROOT / "configs/train/tiny.yaml", [
        "run.name=fsdp", f"run.output_root={tmp_path}", f"train.features={tmp_path / 'features'}",
        f"train.storage_path={tmp_path / 'ckpt'}", "data.holdout_fraction=0.0", "train.cache_data=true",
        "train.strategy=fsdp", "train.num_workers=2", "train.cpus_per_worker=0.5", "train.steps=4",
        "train.batch_size=4", "train.checkpoint_every=2", "train.log_every=1", "train.val_images=0",
        "train.fail_at_step=3", "train.max_failures=1", "train.keep_checkpoints=3"])
    make_feature_shards(cfg, photos[:4], tmp_path / "features", rows_per_shard=2)
    summary = run(cfg)
    assert summary["steps"] == 4, summary

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = summary["mlflow_run_id"]
    assert [int(m.value) for m in client.get_metric_history(run_id, "train/resumed_from_step")] == [2]
    assert sorted({m.step for m in client.get_metric_history(run_id, "train/loss")}) == [1, 2, 3, 4]

    final = Path(summary["checkpoint_uri"])
    model, _, meta = load_checkpoint(str(final), use_ema=False)
    assert meta["extra"]["step"] == 4 and meta["files"][:2] == ["model.safetensors", "ema_model.safetensors"]
    weights = load_file(str(final / "model.safetensors"))
    ema = load_file(str(final / "ema_model.safetensors"))
    assert weights.keys() == ema.keys()
    named = dict(model.named_parameters())
    assert set(named) <= set(weights)
    for name, p in named.items():  # unsharded: every tensor has the model's full shape
        assert tuple(weights[name].shape) == tuple(p.shape) == tuple(ema[name].shape), name
        assert bool(weights[name].isfinite().all()), name

    state = load_train_state(str(final))
    assert "optimizer" not in state and state["position"]["step"] == 4
    opt = state[FULL_OPTIMIZER]
    assert set(opt["state"]) == set(named), "optimizer state must cover every parameter, by name"
    for name, s in opt["state"].items():
        assert tuple(s["exp_avg"].shape) == tuple(named[name].shape), name  # gathered, not a shard
        assert float(s["exp_avg_sq"].abs().sum()) > 0, name
        assert int(s["step"]) == 4, (name, s["step"])  # moments carried across the resume at step 2
    first = load_train_state(str(final.parent / "checkpoint_00000002"))[FULL_OPTIMIZER]
    assert all(int(s["step"]) == 2 for s in first["state"].values())
