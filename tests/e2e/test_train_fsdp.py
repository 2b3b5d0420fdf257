"""train.strategy=fsdp (FSDP2, training/fsdp.py) on real local Ray Train: 2 CPU workers over gloo, tiny preset.

One fit: a worker dies at step 3, FailureConfig restarts the group, it resumes from checkpoint 2 and finishes at 4.
The checkpoints are sharded (torch.distributed.checkpoint): each rank wrote and uploaded its own shards of the
model, the EMA and the AdamW moments into the same checkpoint folder, rank 0 the config, position/RNG state and a
manifest listing every rank's files. The AdamW step counter of 4 in the final checkpoint shows the resumed run
continued the saved moments (a run whose optimizer restarted at the resume would count 2); the weights read back
without a process group (load_checkpoint) and export to the unsharded layout (training/export.py). Every block is
activation-checkpointed (train.activation_checkpointing=1), as a large preset would be under FSDP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray_train  # Ray Train fits on the shared Ray (tests/conftest.py)


def test_fsdp_checkpoints_sharded_and_resumes_the_optimizer(ray_local, photos, tmp_path):
    from mlflow.tracking import MlflowClient

    from inference.model_uri import find_checkpoint
    from jobkit.config import load_config
    from tests.helpers.train_data import make_feature_shards
    from training.pretrain import run
    from training.resume import MANIFEST
    from training.train_state import FULL_OPTIMIZER
    from vosr.checkpoint import load_checkpoint, load_train_state, read_meta
    from vosr.sharded import read_tensors

    cfg = load_config(ROOT / "configs/train/tiny.yaml", [
        "run.name=fsdp", f"run.output_root={tmp_path}", f"train.features={tmp_path / 'features'}",
        f"train.storage_path={tmp_path / 'ckpt'}", "data.holdout_fraction=0.0", "train.cache_data=true",
        "train.strategy=fsdp", "train.num_workers=2", "train.cpus_per_worker=0.5", "train.steps=4",
        "train.batch_size=4", "train.checkpoint_every=2", "train.log_every=1", "train.val_images=0",
        "train.fail_at_step=3", "train.max_failures=1", "train.keep_checkpoints=3",
        "train.activation_checkpointing=1"])  # every block recomputed in backward (re-gathered by FSDP2)
    make_feature_shards(cfg, photos[:4], tmp_path / "features", rows_per_shard=2)
    summary = run(cfg)
    assert summary["steps"] == 4, summary

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = summary["mlflow_run_id"]
    assert [int(m.value) for m in client.get_metric_history(run_id, "train/resumed_from_step")] == [2]
    assert sorted({m.step for m in client.get_metric_history(run_id, "train/loss")}) == [1, 2, 3, 4]

    final = Path(summary["checkpoint_uri"])
    files = json.loads((final / MANIFEST).read_text())["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "config.json", "train_state.json"} <= set(files)
    assert all((final / name).stat().st_size == size for name, size in files.items())
    assert not (final / "model.safetensors").exists()  # nothing was gathered into one file
    assert read_meta(str(final))["layout"] == "dcp"

    model, _, meta = load_checkpoint(str(final), use_ema=False)  # assembled from both ranks' shards
    assert meta["extra"]["step"] == 4 and meta["weights"] == "dcp:model"
    weights = read_tensors(str(final), "model")
    ema = read_tensors(str(final), "ema")
    named = dict(model.named_parameters())
    assert set(named) == set(weights) == set(ema)
    for name, p in named.items():  # every tensor has the model's full shape
        assert tuple(weights[name].shape) == tuple(p.shape) == tuple(ema[name].shape), name
        assert bool(weights[name].isfinite().all()), name
    assert any(not torch.equal(weights[n], ema[n]) for n in named)  # the EMA is its own state

    state = load_train_state(str(final))
    assert "optimizer" not in state and FULL_OPTIMIZER not in state and state["position"]["step"] == 4
    moments = read_tensors(str(final), "optim.state")
    assert {n.rsplit(".", 1)[0] for n in moments} == set(named), "optimizer state must cover every parameter"
    for name, p in named.items():
        assert tuple(moments[f"{name}.exp_avg"].shape) == tuple(p.shape), name  # both ranks' rows
        assert float(moments[f"{name}.exp_avg_sq"].abs().sum()) > 0, name
        assert int(moments[f"{name}.step"]) == 4, name  # moments carried across the resume at step 2
    first = read_tensors(str(final.parent / "checkpoint_00000002"), "optim.state")
    assert all(int(v) == 2 for k, v in first.items() if k.endswith(".step"))

    # The driver exported the final checkpoint for serving and the registry (training/job.export_final).
    assert summary["export_uri"] == str(final.parent / "export_00000004")
    export = Path(summary["export_uri"])
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "ema_model.safetensors", "model.safetensors"]
    assert find_checkpoint(export) == export
    exported, _, emeta = load_checkpoint(str(export))
    assert emeta["weights"] == "ema_model.safetensors" and "layout" not in emeta
    for name, p in exported.named_parameters():
        assert torch.equal(p.detach(), ema[name]), name
