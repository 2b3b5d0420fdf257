"""The shipped cluster configs and manifests against the paper's training recipe (Table 5).

Table 5 (paper, "Training recipe for VOSR"):      PT 256px    PT 512px    Distill to One-step
  learning rate                                    1.0e-4      5.0e-5      2.0e-5
  LR scheduler / warm-up steps                     constant/0  constant/0  constant/0
  training steps                                   400K        400K        50K
  global batch size                                1024        256         32
  weight decay / gradient clip / EMA               0.01 / 1.0 / 0.9999 in all three
  optimizer                                        AdamW (beta1 = 0.9, beta2 = 0.95)
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from jobkit.config import load_config
from training.resume import checkpoint_name
from vosr.storage import join

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "configs" / "cluster"
TABLE5 = {  # config file: (resolution, lr, steps, global batch)
    "pretrain-256.yaml": (256, 1.0e-4, 400_000, 1024),
    "pretrain.yaml": (512, 5.0e-5, 400_000, 256),
    "distill.yaml": (512, 2.0e-5, 50_000, 32),
}


@pytest.mark.parametrize("name", list(TABLE5))
def test_cluster_training_configs_are_table_5(name):
    cfg = load_config(CLUSTER / name)
    res, lr, steps, batch = TABLE5[name]
    tc = cfg.train
    assert (cfg.data.resolution, tc.lr, tc.steps, tc.batch_size) == (res, lr, steps, batch)
    assert tc.warmup_steps == 0  # constant LR, no warm-up
    assert (tc.weight_decay, tc.grad_clip, tc.ema_decay, tuple(tc.betas)) == (0.01, 1.0, 0.9999, (0.9, 0.95))
    assert cfg.data.holdout_fraction == 0.0 and tc.val_images == 0  # evaluation has its own data
    assert tc.batch_size % tc.num_workers == 0


def _final_checkpoint(cfg) -> str:
    return join(cfg.train.storage_path, cfg.run.name, checkpoint_name(cfg.train.steps))


def test_stages_chain_features_and_checkpoints():
    pre256, pre512 = (load_config(CLUSTER / n) for n in ("precompute-256.yaml", "precompute.yaml"))
    pt256, pt512, dist = (load_config(CLUSTER / n) for n in TABLE5)
    assert (pre256.data.resolution, pre512.data.resolution) == (256, 512)
    assert pt256.train.features == pre256.precompute.output
    assert pt512.train.features == dist.train.features == pre512.precompute.output
    assert not pt256.train.init_from  # stage 1 from scratch
    assert pt512.train.init_from == _final_checkpoint(pt256)  # stage 2 from stage 1 (EMA re-initialised)
    assert dist.distill_job.teacher == _final_checkpoint(pt512)
    assert len({pt256.run.name, pt512.run.name, dist.run.name}) == 3


@pytest.mark.parametrize("manifest,configs", [
    ("rayjob-precompute.yaml", ["precompute-256.yaml", "precompute.yaml"]),
    ("rayjob-pretrain.yaml", ["pretrain-256.yaml", "pretrain.yaml"]),
    ("rayjob-distill.yaml", ["distill.yaml"]),
])
def test_manifests_run_the_stages_in_order(manifest, configs):
    doc = yaml.safe_load((ROOT / "infra" / "k8s" / manifest).read_text())
    parts = [shlex.split(p) for p in doc["spec"]["entrypoint"].split("&&")]
    assert [Path(p[p.index("--config") + 1]).name for p in parts] == configs
