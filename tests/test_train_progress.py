"""Progress a person can follow (issue 16 item 6): a short pretraining job joins a dashboard-less local Ray the
way the demo's stages do (RAY_ADDRESS + VOSR_RAY_DASHBOARDLESS=1), and its console log has one progress line per
train.log_every steps (step/total, loss, samples/s, ETA, last checkpoint) and none of Ray Train's placement-group
cleaner warnings, which such a Ray otherwise prints about once a second."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLEANER_WARNING = "Failed to query Ray Train Controller actor state"
LINE = re.compile(r"\[pretrain\] step (\d+)/(\d+) \(([\d.]+)%\) \| loss ([\d.]+) \| ([\d.]+) samples/s \| "
                  r"ETA (\d+:\d\d:\d\d) \| last checkpoint: (step \d+|none yet)")


def test_progress_line_format():
    from training.loop import progress_line

    line = progress_line("distill", 50, 400, 0.123456, 12.5, 3725.4, 40)
    assert line == ("[distill] step 50/400 (12.5%) | loss 0.1235 | 12.50 samples/s | ETA 1:02:05 | "
                    "last checkpoint: step 40")
    assert progress_line("pretrain", 1, 8, None, 1.0, None, None).endswith("ETA n/a | last checkpoint: none yet")


def test_short_run_log_has_progress_lines_and_no_cleaner_flood(ray_local, photos, tmp_path):
    from tests.helpers.train_data import make_feature_shards
    from vosr.config import load_config

    cfg = load_config(ROOT / "configs/train/tiny.yaml")
    features = make_feature_shards(cfg, photos[:4], tmp_path / "features", rows_per_shard=4, variants=2)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "VOSR_RAY_DASHBOARDLESS": "1",
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    cmd = [sys.executable, str(ROOT / "training/pretrain.py"), "--config", str(ROOT / "configs/train/tiny.yaml"),
           "--set", "run.name=progress", "--set", f"run.output_root={tmp_path}", "--set", f"train.features={features}",
           "--set", f"train.storage_path={tmp_path / 'ckpt'}", "--set", "train.steps=6", "--set", "train.log_every=2",
           "--set", "train.checkpoint_every=4", "--set", "train.val_images=0", "--set", "train.num_workers=1",
           "--set", "run.mlflow.enabled=false", "--set", "data.holdout_fraction=0", "--set", "train.batch_size=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    found = [m.groups() for m in LINE.finditer(log)]
    assert [int(g[0]) for g in found] == [2, 4, 6], log[-4000:]
    assert all(g[1] == "6" for g in found)
    assert [g[6] for g in found] == ["none yet", "step 4", "step 6"]
    assert found[-1][5] == "0:00:00" and float(found[0][4]) > 0
    assert CLEANER_WARNING not in log
