"""Ray Train step time against a plain PyTorch loop on the same model, batch and data (target: >= 0.9x), and the
tiny preset's training samples/s on this machine.

Both loops run the same optimiser step (flow-matching loss of vosr/flow.py, AdamW, clip 1.0, EMA) with one torch
thread on the same feature rows (synthetic latents/tokens written in the feature-shard schema). The Ray side is the
real pretraining job (training/pretrain.py, 1 worker, Ray Data streaming the cached rows, MLflow on); its speed is
read from the per-window samples/s the job logs, skipping the first window (start-up, first epoch).

    python benchmarks/bench_train.py [--steps 60] [--batch 8] [--log-every 10] [--rows 64]

Prints one JSON object with both samples/s figures and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_features(cfg, out: Path, rows: int) -> None:
    """Random latents and tokens with the tiny preset's shapes, in the feature-shard schema + metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipelines.features import schema as fsch
    from vosr.encoders import build_autoencoder, build_semantic_encoder

    g = torch.Generator().manual_seed(0)
    lat, sem = fsch.latent_shape(cfg), fsch.sem_shape(cfg)
    dtype = cfg.precompute.dtype
    (out / fsch.SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    per = 16
    for s in range(0, rows, per):
        n = min(per, rows - s)
        table = pa.Table.from_arrays([
            pa.array([f"bench{i:05d}" for i in range(s, s + n)], pa.string()),
            pa.array([0] * n, pa.int32()), pa.array(list(range(s, s + n)), pa.int64()),
            pa.array([[0, 0, cfg.data.resolution, cfg.data.resolution]] * n, pa.list_(pa.int32(), 4)),
            pa.array([[cfg.data.resolution] * 2] * n, pa.list_(pa.int32(), 2)),
            fsch.tensor_to_arrow(torch.randn(n, *lat, generator=g), dtype),
            fsch.tensor_to_arrow(torch.randn(n, *lat, generator=g), dtype),
            fsch.tensor_to_arrow(torch.randn(n, *sem, generator=g), dtype),
            pa.array(["{}"] * n, pa.string()),
        ], schema=fsch.schema_for_config(cfg))
        pq.write_table(table, out / fsch.SHARDS_DIR / f"part-{s // per:05d}.parquet")
    ae, se = build_autoencoder(cfg.autoencoder), build_semantic_encoder(cfg.semantic)
    fsch.write_metadata(str(out), fsch.build_metadata(cfg, ae.identity(), se.identity()))


def plain_loop(cfg, features: Path, steps: int, log_every: int) -> dict:
    """The same step in plain PyTorch: rows in memory, random micro-batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipelines.features.schema import decode_feature_rows
    from training.data import is_holdout
    from vosr.ema import EMA
    from vosr.flow import training_loss
    from vosr.model import build_dit
    from vosr.seeding import generator, rank_seed

    torch.set_num_threads(1)
    table = pa.concat_tables([pq.read_table(p) for p in sorted((features / "shards").glob("*.parquet"))])
    keep = [not is_holdout(i, cfg.data.holdout_fraction) for i in table.column("id").to_pylist()]
    rows = decode_feature_rows(table.filter(pa.array(keep)))
    hq, lq, sem = rows["hr_latent"], rows["lr_latent"], rows["sem_tokens"]
    tc = cfg.train
    torch.manual_seed(0)
    model = build_dit(cfg)
    ema = EMA(model, tc.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), eps=tc.adam_eps,
                            weight_decay=tc.weight_decay)
    windows = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randperm(hq.shape[0], generator=generator(step))[:tc.batch_size]
        loss, _ = training_loss(model, hq[idx], lq[idx], sem[idx], cfg.flow, generator(rank_seed(0, 0, step)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        if step % log_every == 0:
            now = time.perf_counter()
            windows.append(log_every * tc.batch_size / (now - t0))
            t0 = now
    return {"windows_samples_per_s": [round(w, 2) for w in windows],
            "samples_per_s": round(statistics.median(windows[1:] or windows), 2)}


def ray_loop(cfg) -> dict:
    from mlflow.tracking import MlflowClient

    from training.pretrain import run

    summary = run(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.run.output_root).resolve() / 'mlflow.db'}")
    hist = sorted(client.get_metric_history(summary["mlflow_run_id"], "train/samples_per_s"), key=lambda m: m.step)
    windows = [m.value for m in hist]
    return {"windows_samples_per_s": [round(w, 2) for w in windows],
            "samples_per_s": round(statistics.median(windows[1:] or windows), 2),
            "job_samples_per_s_including_startup": summary["samples_per_s"], "stage_s": summary.get("stage_s")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--rows", type=int, default=64)
    args = p.parse_args(argv)

    import ray

    from jobkit.config import load_config

    with tempfile.TemporaryDirectory(prefix="vosr-bench-train-") as tmp:
        tmp = Path(tmp)
        cfg = load_config(ROOT / "configs/train/tiny.yaml", [
            f"run.output_root={tmp}", "run.name=bench", f"train.features={tmp / 'features'}",
            f"train.storage_path={tmp / 'ckpt'}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
            "train.num_workers=1", "train.cpus_per_worker=1", "train.cache_data=true", "train.val_images=0",
            "train.validate_every=0", f"train.checkpoint_every={args.steps}", f"train.log_every={args.log_every}",
            "data.holdout_fraction=0.0"])
        write_features(cfg, tmp / "features", args.rows)
        plain_before = plain_loop(cfg, tmp / "features", args.steps, args.log_every)
        ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        try:
            on_ray = ray_loop(cfg)
        finally:
            ray.shutdown()
        plain_after = plain_loop(cfg, tmp / "features", args.steps, args.log_every)
    # the machine may be shared: the plain loop runs before and after the Ray job and the two are averaged
    plain = {"before": plain_before, "after": plain_after,
             "samples_per_s": round((plain_before["samples_per_s"] + plain_after["samples_per_s"]) / 2, 2)}
    out = {"benchmark": "bench_train", "preset": "tiny", "global_batch": args.batch, "steps": args.steps,
           "torch_threads": 1, "plain_pytorch": plain, "ray_train_1_worker": on_ray,
           "ratio_ray_over_plain": round(on_ray["samples_per_s"] / plain["samples_per_s"], 3), "target": 0.9}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
