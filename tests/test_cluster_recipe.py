"""The shipped cluster configs and manifests against the paper's training recipe (Table 5).

Table 5 (paper, "Training recipe for VOSR"):      PT 256px    PT 512px    Distill to One-step
  learning rate                                    1.0e-4      5.0e-5      2.0e-5
  LR scheduler / warm-up steps                     constant/0  constant/0  constant/0
  training steps                                   400K        400K        50K
  global batch size                                1024        256         32
  weight decay / gradient clip / EMA               0.01 / 1.0 / 0.9999 in all three
  optimizer                                        AdamW (beta1 = 0.9, beta2 = 0.95)

Every shipped config of a real preset is checked: the recipes (configs/train/, configs/distill/,
configs/precompute/) and the cluster files (configs/cluster/) after their `base:` recipe is resolved; a cluster file
may set where a job runs and writes and on what, never a key of the method.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from jobkit.config import load_config
from training.resume import checkpoint_name
from vosr.config import read_yaml
from vosr.config.schema import flatten
from vosr.storage import join

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CLUSTER = CONFIGS / "cluster"
TABLE5 = {  # column: (resolution, lr, steps, global batch)
    "PT 256px": (256, 1.0e-4, 400_000, 1024),
    "PT 512px": (512, 5.0e-5, 400_000, 256),
    "Distill to One-step": (512, 2.0e-5, 50_000, 32),
}
TRAINING = {  # every training config of a real preset: its Table 5 column
    "train/vosr-0.5b-256.yaml": "PT 256px",
    "cluster/pretrain-256.yaml": "PT 256px",
    "train/vosr-0.5b.yaml": "PT 512px",
    "cluster/pretrain.yaml": "PT 512px",
    "distill/vosr-0.5b.yaml": "Distill to One-step",
    "cluster/distill.yaml": "Distill to One-step",
}
FEATURES = {  # every feature config of a real preset: the Table 5 column it feeds
    "precompute/vosr-0.5b-256.yaml": "PT 256px",
    "cluster/precompute-256.yaml": "PT 256px",
    "precompute/vosr-0.5b.yaml": "PT 512px",
    "cluster/precompute.yaml": "PT 512px",
}
OVERLAYS = {  # cluster file: the one recipe it extends
    "pretrain-256.yaml": "train/vosr-0.5b-256.yaml",
    "pretrain.yaml": "train/vosr-0.5b.yaml",
    "distill.yaml": "distill/vosr-0.5b.yaml",
    "precompute-256.yaml": "precompute/vosr-0.5b-256.yaml",
    "precompute.yaml": "precompute/vosr-0.5b.yaml",
}
# What a cluster overlay may set over its recipe: run, MLflow, storage (the checkpoints a stage starts from too),
# model weights' paths, resources.
PLACEMENT = ("run.seed", "run.output_root", "run.mlflow.", "run.ray.", "autoencoder.path", "semantic.path",
             "train.features", "train.storage_path", "train.init_from", "distill_job.teacher",
             "train.s3_endpoint_url", "train.num_workers", "train.use_gpu",
             "train.gpu_memory_gib", "train.grad_accum", "train.cpus_per_worker", "train.max_failures",
             "precompute.input", "precompute.output", "precompute.batch_size", "precompute.encoder_concurrency",
             "precompute.num_gpus_per_encoder", "precompute.num_cpus_per_encoder", "precompute.degrade_batch_size",
             "precompute.rows_per_shard", "precompute.s3_endpoint_url")


def _shipped(*folders: str) -> list[str]:
    """The shipped configs of the real presets in these folders, as paths under configs/."""
    out = []
    for folder in folders:
        for f in sorted((CONFIGS / folder).glob("*.yaml")):
            if read_yaml(f).get("preset", "tiny") != "tiny":
                out.append(f"{folder}/{f.name}")
    return out


def test_every_real_preset_recipe_is_listed():
    """A new recipe or cluster file of a real preset cannot ship without its row here (and so without the checks)."""
    training = [f for f in _shipped("train", "distill", "cluster") if "train" in read_yaml(CONFIGS / f)
                or "distill_job" in read_yaml(CONFIGS / f)]
    features = [f for f in _shipped("precompute", "cluster") if "precompute" in read_yaml(CONFIGS / f)]
    assert sorted(training) == sorted(TRAINING)
    assert sorted(features) == sorted(FEATURES)


@pytest.mark.parametrize("name", list(TRAINING))
def test_training_configs_are_table_5(name):
    cfg = load_config(CONFIGS / name)
    res, lr, steps, batch = TABLE5[TRAINING[name]]
    tc = cfg.train
    assert cfg.preset == "vosr-0.5b"
    assert (cfg.data.resolution, tc.lr, tc.steps, tc.batch_size) == (res, lr, steps, batch)
    assert tc.warmup_steps == 0  # constant LR, no warm-up
    assert (tc.weight_decay, tc.grad_clip, tc.ema_decay, tuple(tc.betas)) == (0.01, 1.0, 0.9999, (0.9, 0.95))
    assert cfg.data.holdout_fraction == 0.0 and tc.val_images == 0  # evaluation has its own data
    assert tc.batch_size % tc.num_workers == 0
    assert tc.batch_size // tc.num_workers % tc.grad_accum == 0  # the global batch is exact after accumulation


@pytest.mark.parametrize("name", list(FEATURES))
def test_feature_configs_match_the_stage_they_feed(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.preset == "vosr-0.5b"
    assert cfg.data.resolution == TABLE5[FEATURES[name]][0]
    assert cfg.degrade.preset == "realesrgan"  # paper s4.1: Real-ESRGAN pairs
    assert (cfg.precompute.mode, cfg.precompute.variants, cfg.precompute.dtype) == ("materialize", 2, "bfloat16")


def _final_checkpoint(cfg) -> str:
    return join(cfg.train.storage_path, cfg.run.name, checkpoint_name(cfg.train.steps))


@pytest.mark.parametrize("files", [
    ("precompute/vosr-0.5b-256.yaml", "precompute/vosr-0.5b.yaml", "train/vosr-0.5b-256.yaml",
     "train/vosr-0.5b.yaml", "distill/vosr-0.5b.yaml"),
    ("cluster/precompute-256.yaml", "cluster/precompute.yaml", "cluster/pretrain-256.yaml", "cluster/pretrain.yaml",
     "cluster/distill.yaml"),
], ids=["recipes", "cluster"])
def test_stages_chain_features_and_checkpoints(files):
    """256 px pretraining from scratch -> 512 px from its last checkpoint -> distillation from the 512 px teacher,
    each reading the features of its resolution."""
    pre256, pre512, pt256, pt512, dist = (load_config(CONFIGS / n) for n in files)
    assert (pre256.data.resolution, pre512.data.resolution) == (256, 512)
    assert pt256.train.features == pre256.precompute.output
    assert pt512.train.features == dist.train.features == pre512.precompute.output
    assert not pt256.train.init_from  # stage 1 from scratch
    assert pt512.train.init_from == _final_checkpoint(pt256)  # stage 2 from stage 1 (EMA re-initialised)
    assert dist.distill_job.teacher == _final_checkpoint(pt512)
    assert len({pt256.run.name, pt512.run.name, dist.run.name}) == 3


@pytest.mark.parametrize("name", list(OVERLAYS))
def test_cluster_files_extend_their_recipe_with_placement_only(name):
    raw = yaml.safe_load((CLUSTER / name).read_text())
    assert (CLUSTER / raw["base"]).resolve() == (CONFIGS / OVERLAYS[name]).resolve()
    declared = [k for k in flatten({k: v for k, v in raw.items() if k != "base"})]
    assert declared and all(k.startswith(PLACEMENT) for k in declared), \
        [k for k in declared if not k.startswith(PLACEMENT)]
    recipe = flatten(load_config(CONFIGS / OVERLAYS[name]).to_dict())
    resolved = flatten(load_config(CLUSTER / name).to_dict())
    changed = [k for k in resolved if resolved[k] != recipe[k]]
    assert all(k.startswith(PLACEMENT) for k in changed), changed


@pytest.mark.parametrize("manifest,configs", [
    ("rayjob-precompute.yaml", ["precompute-256.yaml", "precompute.yaml"]),
    ("rayjob-pretrain.yaml", ["pretrain-256.yaml", "pretrain.yaml"]),
    ("rayjob-distill.yaml", ["distill.yaml"]),
])
def test_manifests_run_the_stages_in_order(manifest, configs):
    doc = yaml.safe_load((ROOT / "infra" / "k8s" / manifest).read_text())
    parts = [shlex.split(p) for p in doc["spec"]["entrypoint"].split("&&")]
    assert [Path(p[p.index("--config") + 1]).name for p in parts] == configs
