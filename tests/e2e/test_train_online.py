"""Teacher pretraining in online mode on real local Ray (2 Ray Train workers): the training job reads curated
Parquet shards and degrades + encodes them inside its Ray Data pipeline (pipelines/features/online.py), writing no feature
shards. That online rows equal the materialised ones for the same (image, variant, seed) is
tests/integration/test_precompute.py::test_online_equals_materialised; this test covers the training path on top of it.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray_train  # Ray Train fits on the shared Ray (tests/conftest.py)
FRACTION = 0.25  # data.holdout_fraction


def small_png(path: Path) -> tuple[bytes, tuple[int, int]]:
    """The photo as an RGB PNG of at most 96 px a side, and its size."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((96, 96))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue(), im.size


def curated_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def curated_shard(photos: list[Path], root: Path) -> Path:
    """One curated shard (pipelines/curate_schema.CURATED_SCHEMA) of small PNGs, plus one dropped duplicate row."""
    from pipelines.curate_schema import CURATED_SCHEMA

    rows = []
    for p in photos:
        data, (w, h) = small_png(p)
        rows.append({"id": curated_id(data), "source": str(p), "image": data, "format": "png",
                     "width": w, "height": h, "kept": True})
    rows.append({"id": "dup0", "source": "x", "image": None, "kept": False, "duplicate_of": rows[0]["id"],
                 "drop_reason": "duplicate"})
    shards = root / "shards"
    shards.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=CURATED_SCHEMA), shards / "part-00000.parquet")
    return root


def split_photos(photos: list[Path], n_train: int, n_val: int) -> list[Path]:
    """Photos whose curated id (hash of the PNG bytes written above) lands on each side of the hold-out split."""
    from training.data import is_holdout

    train, val = [], []
    for p in photos:
        sid = curated_id(small_png(p)[0])
        (val if is_holdout(sid, FRACTION) else train).append(p)
    assert len(train) >= n_train and len(val) >= n_val, "not enough photos on each side of the hold-out split"
    return train[:n_train] + val[:n_val]


def test_pretrain_online_mode_reads_curated_shards(ray_local, photos, tmp_path):
    from mlflow.tracking import MlflowClient

    from jobkit.config import load_config
    from training.pretrain import run
    from vosr.checkpoint import load_checkpoint, load_train_state

    curated = curated_shard(split_photos(photos, 4, 1), tmp_path / "curated")
    # CPU budget of the 2-CPU test Ray: 2 workers x 0.25 + one encoder actor x 0.25 per pipeline (train, held-out)
    # leave 1 CPU for Ray Data's 1-CPU read tasks; at 0.5 per worker the reads never get scheduled
    cfg = load_config(ROOT / "configs/train/tiny.yaml", [
        "run.name=online", f"run.output_root={tmp_path}", "train.online=true", f"precompute.input={curated}",
        "precompute.variants=2", "precompute.batch_size=4", "precompute.degrade_batch_size=2",
        "precompute.num_cpus_per_degrade=0.25", "precompute.num_cpus_per_encoder=0.25",
        f"data.holdout_fraction={FRACTION}", f"train.features={tmp_path / 'no-features'}",
        f"train.storage_path={tmp_path / 'ckpt'}", "train.steps=4", "train.batch_size=4", "train.num_workers=2",
        "train.cpus_per_worker=0.25", "train.checkpoint_every=2", "train.log_every=1", "train.validate_every=4",
        "train.val_images=1", "train.shuffle_buffer=0"])
    summary = run(cfg)

    assert summary["steps"] == 4 and summary["data"]["mode"] == "online", summary
    assert not (tmp_path / "no-features").exists(), "online mode must not need or write feature shards"
    # 4 train images x 2 variants = 8 rows, split over 2 workers: 4 steps x 2 rows per worker = 2 epochs
    local = Path(summary["checkpoint_uri"])
    model, _, meta = load_checkpoint(str(local))
    assert meta["extra"]["step"] == 4 and all(bool(p.isfinite().all()) for p in model.parameters())
    assert load_train_state(str(local))["position"]["epoch"] >= 1
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = summary["mlflow_run_id"]
    losses = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]
    assert all(0 < m.value < 100 for m in losses)
    assert client.get_metric_history(run_id, "val/psnr_y"), "validation on the held-out online rows did not run"
    assert client.get_run(run_id).data.params["train.online"] == "True"
