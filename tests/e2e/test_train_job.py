"""Teacher pretraining on real local Ray Train (2 workers), real MLflow, real feature shards from photos.

One scenario on s3:// storage (moto server) tracked by an MLflow server process (sqlite backend): a job whose
worker dies with no retries left stops; re-submitted, it resumes from its last checkpoint, survives a second worker
loss through FailureConfig, finishes with continuous step numbers, a falling loss and the params, metrics and
validation grids in MLflow; re-submitted once more, it does nothing new.
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

from tests.helpers.mlflow_server import MLFLOW_SERVER_ENV

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray_train  # Ray Train fits on the shared Ray (tests/conftest.py)
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
    from jobkit.config import load_config

    return load_config(ROOT / "configs/train/tiny.yaml", [
        f"run.name={name}", f"run.output_root={tmp}", f"train.features={features}",
        f"train.storage_path={tmp / 'ckpt'}", "data.holdout_fraction=0.25", "train.cache_data=true",
        "train.log_every=1", "train.val_images=2", "train.ema_decay=0.9", *extra])


@pytest.fixture(scope="module")
def features(tmp_path_factory, photos):
    from jobkit.config import load_config
    from tests.helpers.train_data import make_feature_shards

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
                            env={**os.environ, **MLFLOW_SERVER_ENV}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/health", proc, timeout=120)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_pretrain_interrupted_resumed_fault_tolerant_tracked_and_idempotent(ray_local, features, tmp_path, moto_s3,
                                                                          mlflow_server):
    import ray.train
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from training.pretrain import run
    from vosr import storage
    from vosr.checkpoint import load_checkpoint, load_train_state

    base = ["train.steps=8", "train.checkpoint_every=2", "train.validate_every=4",
            "train.storage_path=s3://vosr-runs/ckpt", f"train.s3_endpoint_url={moto_s3}",
            f"run.mlflow.tracking_uri={mlflow_server}"]
    run_uri = "s3://vosr-runs/ckpt/pt"
    client = MlflowClient(tracking_uri=mlflow_server)

    # 1. a worker dies at step 5 with no retries left: the job stops after the step-4 checkpoint
    with pytest.raises(ray.train.TrainingFailedError):
        run(tiny_cfg(tmp_path, features, "pt", *base, "train.fail_at_step=5", "train.max_failures=0"))
    files = storage.list_files(run_uri, "", moto_s3)
    assert any(f.endswith("checkpoint_00000004/model.safetensors") for f in files)
    assert not any("checkpoint_00000006" in f for f in files)
    assert storage.exists(f"{run_uri}/_vosr_fault_injected_step5", moto_s3)
    run_id = json.loads(storage.read_bytes(f"{run_uri}/_vosr_run.json", moto_s3))["run_id"]
    assert client.get_run(run_id).info.status == "FAILED"

    # 2. re-submitted: resumes from step 4; a worker dies again at step 7 and FailureConfig restores step 6
    cfg = tiny_cfg(tmp_path, features, "pt", *base, "train.fail_at_step=7", "train.max_failures=1")
    summary = run(cfg)
    assert summary["steps"] == 8 and summary["steps_this_submission"] == 4
    assert summary["mlflow_run_id"] == run_id, "a resumed job continues its MLflow run"
    assert summary["checkpoint_uri"] == f"{run_uri}/checkpoint_00000008"
    assert storage.exists(f"{run_uri}/_vosr_fault_injected_step7", moto_s3)
    assert json.loads(storage.read_bytes(f"{run_uri}/summary.json", moto_s3))["steps"] == 8

    local = tmp_path / "final"
    ray.train.Checkpoint(summary["checkpoint_uri"].removeprefix("s3://"),
                         filesystem=storage.open_fs(run_uri, moto_s3)[0]).to_directory(str(local))
    _, _, meta = load_checkpoint(str(local))
    assert not meta["is_student"] and meta["files"][:2] == ["model.safetensors", "ema_model.safetensors"]
    state = load_train_state(str(local))
    assert state["position"]["step"] == 8 and state["position"]["samples"] == 64
    assert state["optimizer"]["state"], "optimizer moments were not saved"

    mrun = client.get_run(run_id)
    assert mrun.info.status == "FINISHED"
    # a tracking server keeps the artifacts behind its proxy (--artifacts-destination): workers on other machines
    # upload through it, never to a path on one machine (jobkit.tracking.resolve_artifact_location)
    assert mrun.info.artifact_uri.startswith("mlflow-artifacts:/"), mrun.info.artifact_uri
    params = mrun.data.params
    assert params["train.lr"] == "0.0005" and params["train.betas"] == "[0.9, 0.95]"
    assert params["preset"] == "tiny" and params["train.grad_clip"] == "1.0"
    # steps 1-4 | resumed: 5.. | worker lost at 7, restored: ..8. Every restart continues right after the latest
    # complete checkpoint, 4 then 6, also when Ray Train's controller had not yet registered it before the worker
    # died (training/resume.py); the unregistered uploads are pruned at the end (keep_checkpoints below).
    restarts = sorted(client.get_metric_history(run_id, "train/resumed_from_step"), key=lambda m: m.timestamp)
    resumed = [int(m.value) for m in restarts]
    assert resumed == [4, 6], resumed
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: (m.timestamp, m.step))
    logged = [m.step for m in history]
    for r in restarts:  # the first step logged after a restart follows the restored checkpoint
        assert next(m.step for m in history if m.timestamp >= r.timestamp) == int(r.value) + 1, (logged, resumed)
    assert all(b <= a + 1 for a, b in zip(logged, logged[1:])), f"a gap in the logged steps: {logged}"
    assert logged[0] == 1 and logged[-1] == 8 and sorted(set(logged)) == list(range(1, 9))
    for key in ("train/lr", "train/samples_per_s", "train/grad_norm", "val/psnr_y", "val/ssim_y"):
        assert client.get_metric_history(run_id, key), f"{key} was not logged"
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, f"loss did not fall: {losses}"
    grids = [a.path for a in client.list_artifacts(run_id, "validation")]
    assert {"validation/val_grid_step00000004.png", "validation/val_grid_step00000008.png"} <= set(grids)
    png = client.download_artifacts(run_id, "validation/val_grid_step00000008.png", str(tmp_path))
    grid = Image.open(io.BytesIO(Path(png).read_bytes()))
    assert any((tmp_path / "server-artifacts").rglob("val_grid_step00000008.png")), "not stored by the server"
    assert grid.size[0] > 3 * 64 and grid.size[1] > 2 * 64  # LR | sample | HR, one row per held-out image

    # 3. re-submitted once finished: nothing new
    n_loss = len(client.get_metric_history(run_id, "train/loss"))
    again = run(cfg)
    assert again["skipped"] is True and again["steps_this_submission"] == 0 and again["steps"] == 8
    assert len(client.get_metric_history(run_id, "train/loss")) == n_loss
    ckpts = {f.split("/")[-2] for f in storage.list_files(run_uri, "config.json", moto_s3)}
    assert ckpts == {"checkpoint_00000006", "checkpoint_00000008"}  # keep_checkpoints = 2
