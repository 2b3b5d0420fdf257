"""One-step distillation on real local Ray Train (2 workers) with a real MLflow sqlite store and model registry.

The teacher is a tiny multi-step model trained here in-process (plain PyTorch, flow-matching loss of vosr/flow.py)
on feature shards made from real photos, saved in the checkpoint format the jobs use.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.e2e.test_train_job import pick_photos

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray_train  # Ray Train fits on the shared Ray (tests/conftest.py)
TEACHER_STEPS = 150




def _rows(features: Path):
    from pipelines.features.schema import decode_feature_rows

    table = pa.concat_tables([pq.read_table(p) for p in sorted((features / "shards").glob("*.parquet"))])
    rows = decode_feature_rows(table)
    return rows["hr_latent"], rows["lr_latent"], rows["sem_tokens"]


@pytest.fixture(scope="module")
def features(tmp_path_factory, photos):
    from jobkit.config import load_config
    from tests.helpers.train_data import make_feature_shards

    cfg = load_config(ROOT / "configs/distill/tiny.yaml")
    return make_feature_shards(cfg, pick_photos(photos, 0.25, 9, 3), tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, features):
    """A tiny teacher trained in-process long enough that its sampling paths bend (one Euler step is off)."""
    from jobkit.config import load_config
    from vosr.checkpoint import save_checkpoint
    from vosr.flow import training_loss
    from vosr.model import build_dit
    from vosr.seeding import generator

    cfg = load_config(ROOT / "configs/train/tiny.yaml")
    hq, lq, sem = _rows(features)
    torch.manual_seed(0)
    model = build_dit(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.01)
    for step in range(TEACHER_STEPS):
        idx = torch.randperm(hq.shape[0], generator=generator(step))[:8]
        loss, _ = training_loss(model, hq[idx], lq[idx], sem[idx], cfg.flow, generator(10_000 + step))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    folder = tmp_path_factory.mktemp("teacher") / "checkpoint"
    save_checkpoint(str(folder), cfg, model, ema=model, extra={"step": TEACHER_STEPS})
    return folder


def distill_cfg(tmp: Path, features: Path, teacher: Path, *extra: str):
    from jobkit.config import load_config

    return load_config(ROOT / "configs/distill/tiny.yaml", [
        f"run.output_root={tmp}", f"train.features={features}", f"train.storage_path={tmp / 'ckpt'}",
        f"distill_job.teacher={teacher}", "data.holdout_fraction=0.25", "train.cache_data=true", *extra])


def test_fresh_student_reproduces_the_teacher_velocity_at_r_equal_t(teacher, features, tmp_path):
    from training.objectives import DistillObjective
    from vosr.checkpoint import load_checkpoint

    cfg = distill_cfg(tmp_path, features, teacher)
    objective = DistillObjective(cfg, torch.device("cpu"))
    student = objective.build_model().eval()
    reference, _, _ = load_checkpoint(str(teacher))
    assert student.is_student and not any(p.requires_grad for p in objective.teacher.parameters())
    hq, lq, sem = _rows(features)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(hq[:4].shape, generator=g)
    t = torch.rand(4, generator=g)
    with torch.no_grad():
        v_teacher = reference(z, t, lq[:4], sem[:4])
        v_student = student(z, t, lq[:4], sem[:4], r=t)
        v_gap = student(z, t, lq[:4], sem[:4], r=t * 0.3)
    assert v_teacher.abs().mean() > 1e-2, "the teacher should predict a non-trivial velocity"
    torch.testing.assert_close(v_student, v_teacher, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v_gap, v_teacher, atol=1e-5), "r != t must reach the new target-time embedding"


def test_distillation_moves_onestep_toward_the_teacher_and_registers_the_student(ray_local, teacher, features,
                                                                                   tmp_path):
    import mlflow

    from training.distill import run
    from vosr.checkpoint import load_checkpoint
    from vosr.distill import student_from_teacher
    from vosr.flow import sample_fewstep, sample_multistep
    from vosr.seeding import generator

    cfg = distill_cfg(tmp_path, features, teacher, "run.name=student", "train.steps=40", "train.lr=1.0e-4",
                      "train.ema_decay=0.9", "train.checkpoint_every=20", "train.validate_every=0",
                      "train.val_images=2", "train.log_every=10", "distill_job.register_name=tiny-student")
    assert cfg.distill.method == "rcgm" and cfg.distill.omega == 0.5
    t_model, _, _ = load_checkpoint(str(teacher))
    hq, lq, sem = _rows(features)
    noise = torch.randn(lq.shape, generator=generator(7))
    with torch.no_grad():
        # the teacher target of docs/method.md s7: guidance omega with the weak branch at w = 0.1, 25 Euler steps
        target = sample_multistep(t_model, lq, sem, steps=25, guidance_scale=cfg.distill.omega,
                                  weak_strength=cfg.distill.weak_strength, noise=noise)
        torch.manual_seed(0)
        fresh = student_from_teacher(t_model, cfg).eval()
        before = torch.mean((sample_fewstep(fresh, lq, sem, 1, noise) - target) ** 2).item()

    summary = run(cfg)
    assert summary["job"] == "distill" and summary["steps"] == 40
    assert {"loss", "base_loss", "consistency_loss"} <= set(summary["final_losses"])
    reg = summary["registered_model"]
    assert reg["name"] == "tiny-student" and reg["version"] == 1 and reg["uri"] == "models:/tiny-student/1"
    assert reg["alias"] == "champion" and len(summary["data"]["version"]) == 12

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    local = Path(mlflow.artifacts.download_artifacts("models:/tiny-student/1", dst_path=str(tmp_path / "dl")))
    folders = [p.parent for p in local.rglob("config.json") if (p.parent / "model.safetensors").is_file()]
    assert len(folders) == 1, f"expected one checkpoint folder in the registered model, got {folders}"
    assert not (folders[0] / "train_state.safetensors").exists(), "optimizer state is not shipped for serving"
    student, _, meta = load_checkpoint(str(folders[0]))
    assert meta["is_student"] and meta["extra"]["step"] == 40
    with torch.no_grad():
        after = torch.mean((sample_fewstep(student, lq, sem, 1, noise) - target) ** 2).item()
    assert after < before, f"one-step output did not move toward the teacher's 25-step output: {before} -> {after}"

    client = mlflow.tracking.MlflowClient()
    # the version distillation registered: the champion, tagged with what it is and where it came from
    champion = client.get_model_version_by_alias("tiny-student", "champion")
    assert str(champion.version) == "1" and champion.tags["vosr.training_run"] == summary["mlflow_run_id"]
    assert champion.tags["vosr.preset"] == "tiny" and champion.tags["vosr.steps"] == "40"
    assert champion.tags["vosr.data_version"] == summary["data"]["version"]
    run_info = client.get_run(summary["mlflow_run_id"])
    assert run_info.data.params["distill.method"] == "rcgm" and run_info.info.status == "FINISHED"
    assert client.get_metric_history(summary["mlflow_run_id"], "train/consistency_loss")
