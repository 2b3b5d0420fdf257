"""Teacher pretraining on real local Ray Train (2 workers), real MLflow, real feature shards from photos.

One fault-injected run covers: the loss falls, MLflow holds params/metrics/the validation grid, a worker killed
mid-run is restored from the last checkpoint with continuous step numbers, and a re-submitted finished job does
nothing new. A second run on s3:// storage (moto server) with an MLflow tracking server process is interrupted
(no retries left) and resumes when re-submitted.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)  # the moto server accepts any key; workers inherit this environment


def pick_photos(photos, fraction: float, n_train: int, n_val: int) -> list[Path]:
    from training.data import is_holdout

    train = [p for p in photos if not is_holdout(p.stem, fraction)][:n_train]
    val = [p for p in photos if is_holdout(p.stem, fraction)][:n_val]
    assert len(train) == n_train and len(val) == n_val, "not enough photos on each side of the hold-out split"
    return train + val


def tiny_cfg(tmp: Path, features: Path, name: str, *extra: str):
    from vosr.config import load_config

    return load_config(ROOT / "configs/train/tiny.yaml", [
        f"run.name={name}", f"run.output_root={tmp}", f"train.features={features}",
        f"train.storage_path={tmp / 'ckpt'}", "data.holdout_fraction=0.25", "train.cache_data=true",
        "train.log_every=1", "train.val_images=2", "train.ema_decay=0.9", *extra])


@pytest.fixture(scope="module")
def features(tmp_path_factory, photos):
    from tests.helpers.train_data import make_feature_shards
    from vosr.config import load_config

    cfg = load_config(ROOT / "configs/train/tiny.yaml")
    out = tmp_path_factory.mktemp("features")
    return make_feature_shards(cfg, pick_photos(photos, 0.25, 9, 3), out, rows_per_shard=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=2.0)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def _metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_fault_injected_run_restores_logs_and_skips_when_resubmitted(ray_local, features, tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from training.pretrain import run
    from vosr.checkpoint import load_checkpoint, load_train_state

    cfg = tiny_cfg(tmp_path, features, "ft", "train.steps=8", "train.checkpoint_every=2",
                   "train.validate_every=4", "train.fail_at_step=5", "train.max_failures=1")
    summary = run(cfg)

    assert summary["steps"] == 8 and summary["steps_this_submission"] == 8
    run_dir = tmp_path / "ckpt" / "ft"
    assert (run_dir / "_vosr_fault_injected_step5").is_file(), "the fault was never injected"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    ckpt = Path(summary["checkpoint_uri"])
    assert ckpt.name == "checkpoint_00000008"
    model, _, meta = load_checkpoint(str(ckpt))
    assert not meta["is_student"] and meta["files"][:2] == ["model.safetensors", "ema_model.safetensors"]
    state = load_train_state(str(ckpt))
    assert state["position"]["step"] == 8 and state["position"]["samples"] == 64
    assert state["optimizer"]["state"], "optimizer moments were not saved"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = summary["mlflow_run_id"]
    mrun = client.get_run(run_id)
    assert mrun.info.status == "FINISHED"
    assert mrun.info.artifact_uri.startswith("file:///"), "artifact location must be absolute"
    params = mrun.data.params
    assert params["train.lr"] == "0.0005" and params["train.betas"] == "[0.9, 0.95]"
    assert params["preset"] == "tiny" and params["train.fail_at_step"] == "5"
    # restored from the step-4 checkpoint: steps 1-4, then 5-8, no gap and no repeat
    assert _metric_steps(client, run_id, "train/loss") == list(range(1, 9))
    assert [m.value for m in client.get_metric_history(run_id, "train/resumed_from_step")] == [4.0]
    for key in ("train/lr", "train/samples_per_s", "train/grad_norm", "val/psnr_y", "val/ssim_y"):
        assert client.get_metric_history(run_id, key), f"{key} was not logged"
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, f"loss did not fall: {losses}"
    grids = [a.path for a in client.list_artifacts(run_id, "validation")]
    assert "validation/val_grid_step00000008.png" in grids
    local = client.download_artifacts(run_id, "validation/val_grid_step00000008.png", str(tmp_path))
    grid = Image.open(io.BytesIO(Path(local).read_bytes()))
    assert grid.size[0] > 3 * 64 and grid.size[1] > 2 * 64  # LR | sample | HR, one row per held-out image

    n_loss = len(client.get_metric_history(run_id, "train/loss"))
    again = run(cfg)
    assert again["skipped"] is True and again["steps_this_submission"] == 0 and again["steps"] == 8
    assert len(client.get_metric_history(run_id, "train/loss")) == n_loss
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_00000006", "checkpoint_00000008"]
    del model


@pytest.fixture()
def moto_s3(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url, proc)
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}).mkdir("vosr-runs")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture()
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/health", proc, timeout=120)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_interrupted_run_on_s3_resumes_when_resubmitted(ray_local, features, tmp_path, moto_s3, mlflow_server):
    import ray.train
    from mlflow.tracking import MlflowClient

    from training.pretrain import run
    from vosr import storage

    cfg = tiny_cfg(tmp_path, features, "s3run", "train.steps=4", "train.checkpoint_every=2",
                   "train.validate_every=0", "train.fail_at_step=3", "train.max_failures=0",
                   "train.storage_path=s3://vosr-runs/ckpt", f"train.s3_endpoint_url={moto_s3}",
                   f"run.mlflow.tracking_uri={mlflow_server}")
    with pytest.raises(ray.train.TrainingFailedError):
        run(cfg)  # no retries left: the job stops after the step-2 checkpoint
    files = storage.list_files("s3://vosr-runs/ckpt/s3run", "", moto_s3)
    assert any(f.endswith("checkpoint_00000002/model.safetensors") for f in files)
    assert not any("checkpoint_00000004" in f for f in files)

    summary = run(cfg)  # re-submitted as is: resumes from the step-2 checkpoint on S3
    assert summary["steps"] == 4 and summary["steps_this_submission"] == 2
    assert summary["checkpoint_uri"] == "s3://vosr-runs/ckpt/s3run/checkpoint_00000004"
    assert storage.exists("s3://vosr-runs/ckpt/s3run/checkpoint_00000004/config.json", moto_s3)
    client = MlflowClient(tracking_uri=mlflow_server)
    run_id = summary["mlflow_run_id"]
    assert _metric_steps(client, run_id, "train/loss") == [1, 2, 3, 4]
    assert [m.value for m in client.get_metric_history(run_id, "train/resumed_from_step")] == [2.0]
    assert client.get_run(run_id).info.status == "FINISHED"
