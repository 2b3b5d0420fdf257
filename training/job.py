"""The driver side shared by pretrain.py and distill.py, as named stages:

resolve_run -> finished_summary (a finished run does nothing new) -> connect -> open_data -> start_tracking ->
fit (Ray TorchTrainer; FailureConfig retries, resumes from the latest checkpoint in the run's storage) ->
summarise -> export_final (FSDP: the sharded final checkpoint as one unsharded folder) -> (distill: register) ->
finish (summary.json + done marker in the storage path, MLflow run closed).

A re-submitted job with the same run name and storage path resumes by itself, and so do workers Ray Train
restarts after a failure: rank 0 takes the latest complete checkpoint in the run's storage folder (or
`ray.train.get_checkpoint()` when that is as new), see training/resume.py for why Ray's registered one alone is
not enough after a node loss.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vosr import storage

RUN_INFO = "_vosr_run.json"
SUMMARY = "summary.json"


@dataclass
class RunPaths:
    storage_uri: str      # train.storage_path, absolute when local
    name: str             # run.name: the Ray Train run folder and the MLflow run name
    run_uri: str          # storage_uri/name
    endpoint: str

    def file(self, name: str) -> str:
        return storage.join(self.run_uri, name)


def resolve_run(cfg: Any) -> RunPaths:
    tc = cfg.train
    uri = tc.storage_path
    if not storage.is_remote(uri):
        uri = str(Path(uri.removeprefix("file://")).resolve())
    return RunPaths(uri, cfg.run.name, storage.join(uri, cfg.run.name), tc.s3_endpoint_url)


def _read_json(uri: str, endpoint: str) -> dict[str, Any] | None:
    if not storage.exists(uri, endpoint):
        return None
    return json.loads(storage.read_bytes(uri, endpoint))


def _write_json(uri: str, data: dict[str, Any], endpoint: str) -> None:
    storage.write_bytes_atomic(uri, json.dumps(data, indent=2, sort_keys=True).encode(), endpoint)


def finished_summary(paths: RunPaths) -> dict[str, Any] | None:
    """The stored summary when this run already finished (its done marker exists)."""
    from training.loop import DONE_MARKER

    done = _read_json(paths.file(DONE_MARKER), paths.endpoint)
    if done is None:
        return None
    summary = _read_json(paths.file(SUMMARY), paths.endpoint) or {}
    return {**summary, "skipped": True, "reason": "run already finished (done marker present)",
            "steps_this_submission": 0}


def connect(cfg: Any) -> None:
    from jobkit.ray_env import init_ray

    init_ray(cfg, ray_train=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # keeps job logs readable


def start_tracking(cfg: Any, paths: RunPaths, job: str) -> tuple[str, str]:
    """(tracking URI, MLflow run id). A resumed run continues the MLflow run it started."""
    if not cfg.run.mlflow.enabled:
        return "", ""
    from mlflow.tracking import MlflowClient

    from jobkit.tracking import resolve_tracking_uri, setup_mlflow
    from vosr.config import redact, redact_text
    from vosr.config.schema import flatten

    exp_id = setup_mlflow(cfg)
    uri = resolve_tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    info = _read_json(paths.file(RUN_INFO), paths.endpoint)
    if info and info.get("tracking_uri") in (uri, redact_text(uri)):
        run_id = info["run_id"]
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "vosr.resubmitted", "true")
        return uri, run_id
    run = client.create_run(exp_id, run_name=paths.name, tags={"vosr.job": job, "vosr.preset": cfg.preset,
                                                               "vosr.storage": paths.run_uri})
    from training.tracking import RunLogger

    params = flatten(redact(cfg))
    RunLogger(uri, run.info.run_id).params(params)
    _write_json(paths.file(RUN_INFO), {"run_id": run.info.run_id, "tracking_uri": redact_text(uri),
                                       "experiment_id": exp_id, "job": job}, paths.endpoint)
    return uri, run.info.run_id


def _storage_filesystem(paths: RunPaths):
    if storage.is_remote(paths.storage_uri):
        fs, path = storage.open_fs(paths.storage_uri, paths.endpoint)
        return fs, path
    return None, paths.storage_uri


def fit(cfg: Any, job: str, paths: RunPaths, datasets: dict[str, Any], tracking_uri: str, run_id: str,
        feature_meta: dict | None = None):
    import ray.train
    from ray.train.torch import TorchTrainer

    from training.loop import train_loop_per_worker

    tc = cfg.train
    fs, storage_path = _storage_filesystem(paths)
    spec = {"job": job, "cfg": cfg.to_dict(), "run_uri": paths.run_uri, "endpoint": paths.endpoint,
            "tracking_uri": tracking_uri, "run_id": run_id, "feature_meta": feature_meta}
    resources = {"CPU": tc.cpus_per_worker}
    run_config = ray.train.RunConfig(
        name=paths.name, storage_path=storage_path, storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints))
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=spec,
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker=resources),
        run_config=run_config, datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))
    return trainer.fit()


def checkpoint_uri(paths: RunPaths, checkpoint: Any) -> str:
    if checkpoint is None:
        return ""
    return f"s3://{checkpoint.path}" if storage.is_remote(paths.storage_uri) else checkpoint.path


def summarise(cfg: Any, job: str, paths: RunPaths, result: Any, run_id: str, wall_s: float,
              start_step: int) -> dict[str, Any]:
    metrics = dict(result.metrics or {})
    steps = int(metrics.get("step", 0))
    run_steps = max(steps - start_step, 0)
    losses = {k.removeprefix("train/"): v for k, v in metrics.items()
              if k.startswith("train/") and "loss" in k}
    return {
        "job": job,
        "run_name": paths.name,
        "steps": steps,
        "steps_this_submission": run_steps,
        "global_batch": cfg.train.batch_size,
        "num_workers": cfg.train.num_workers,
        "samples_per_s": round(run_steps * cfg.train.batch_size / max(wall_s, 1e-9), 3),
        "samples_per_s_last_window": metrics.get("train/samples_per_s"),
        "wall_s": round(wall_s, 2),
        "final_losses": losses,
        "validation": {k: v for k, v in metrics.items() if k.startswith("val/")},
        "checkpoint_uri": checkpoint_uri(paths, result.checkpoint),
        "storage_uri": paths.run_uri,
        "mlflow_run_id": run_id,
    }


def latest_step(paths: RunPaths) -> int:
    """Step of the latest complete checkpoint in the run's storage (0 when none); see training/resume.py."""
    from training.resume import latest_complete

    found = latest_complete(paths.run_uri, paths.endpoint)
    return found[0] if found else 0


def prune_checkpoints(cfg: Any, paths: RunPaths, result: Any, final_step: int) -> list[str]:
    """Drop checkpoint uploads Ray Train never registered (their workers died before the controller collected
    the report; a restart resumed from them, training/resume.py) so train.keep_checkpoints holds."""
    from training.resume import prune_untracked

    tracked = {str(c.path).rstrip("/").rsplit("/", 1)[-1] for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        tracked.add(str(result.checkpoint.path).rstrip("/").rsplit("/", 1)[-1])
    return prune_untracked(paths.run_uri, paths.endpoint, tracked, cfg.train.keep_checkpoints, final_step)


def export_final(paths: RunPaths, result: Any) -> str:
    """An FSDP run's checkpoints are sharded (training/fsdp.py); serving, evaluation and the registry read one
    unsharded folder. Export the final checkpoint to <run>/export_<step> (training/export.py, streamed, no
    process group) and return its URI; "" when the final checkpoint is unsharded already (or none)."""
    from training.export import export_checkpoint, is_sharded
    from training.resume import checkpoint_step

    uri = checkpoint_uri(paths, result.checkpoint)
    if not uri or not is_sharded(uri, paths.endpoint):
        return ""
    dst = paths.file(f"export_{checkpoint_step(uri) or 0:08d}")
    export_checkpoint(uri, dst, paths.endpoint)
    return dst


def finish(paths: RunPaths, summary: dict[str, Any], tracking_uri: str, run_id: str) -> None:
    from training.loop import DONE_MARKER
    from vosr.config import redact

    summary = redact(summary)
    _write_json(paths.file(SUMMARY), summary, paths.endpoint)
    _write_json(paths.file(DONE_MARKER), {"steps": summary["steps"], "time": time.time()}, paths.endpoint)
    if run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        client.log_dict(run_id, summary, "summary.json")
        client.set_terminated(run_id, "FINISHED")


def fail_tracking(tracking_uri: str, run_id: str) -> None:
    if run_id:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, "FAILED")


def data_version(metadata: dict | None) -> str:
    """A short fingerprint of the training data's metadata (the feature set's encoders, shapes, degradation and
    counts; or the online pipeline's): equal data, equal version. Empty when there is none."""
    if not metadata:
        return ""
    import hashlib

    return hashlib.sha256(json.dumps(metadata, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_job(cfg: Any, job: str, after_fit=None) -> dict[str, Any]:
    """The whole driver for `job` ("pretrain" or "distill"). `after_fit(summary, result, paths, tracking_uri,
    run_id)` may return keys to add to the summary."""
    from training.data import training_datasets

    stage_s: dict[str, float] = {}
    clock = time.perf_counter()

    def timed(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stage_s[name] = round(now - clock, 2)
        clock = now

    paths = resolve_run(cfg)
    done = finished_summary(paths)
    if done is not None:
        return done
    connect(cfg)
    timed("connect")
    train_ds, val_ds, data_info = training_datasets(cfg)
    timed("open_data")
    tracking_uri, run_id = start_tracking(cfg, paths, job)
    timed("start_tracking")
    start_step = latest_step(paths)
    t0 = time.perf_counter()
    try:
        result = fit(cfg, job, paths, {"train": train_ds, "val": val_ds}, tracking_uri, run_id,
                     data_info.get("metadata"))
    except BaseException:
        fail_tracking(tracking_uri, run_id)
        raise
    timed("fit")
    summary = summarise(cfg, job, paths, result, run_id, time.perf_counter() - t0, start_step)
    summary["data"] = {k: v for k, v in data_info.items() if k != "metadata"}
    summary["data"]["version"] = data_version(data_info.get("metadata"))
    summary["pruned_checkpoints"] = prune_checkpoints(cfg, paths, result, summary["steps"])
    summary["export_uri"] = export_final(paths, result)
    if summary["export_uri"]:
        timed("export")
    if after_fit is not None:
        summary.update(after_fit(summary, result, paths, tracking_uri, run_id) or {})
        timed("after_fit")
    summary["stage_s"] = stage_s
    finish(paths, summary, tracking_uri, run_id)
    return summary


# --- vosr plan ---------------------------------------------------------------------------------------------------
# Assumptions and measured constants of the training plan (docs/scale.md explains each).

DRIVER_BASE_BYTES = 2 << 30  # the driver with Ray Train's controller and Ray Data's executor (assumption)
# Driver bytes per row group of the feature shards while Ray Data plans an epoch (the units, the epoch's order
# and one ReadTask per block of units; measured: benchmarks/bench_memory_reads.py --only training-plan)
DRIVER_BYTES_PER_UNIT = 1024
STATE_BYTES_PER_PARAM = 16  # fp32 weights, EMA and two AdamW moments: one copy on the host at checkpoint time
# DiT GFLOPs per training sample (benchmarks/flops.py, docs/scale.md s3): fwd+bwd (pretrain) and RCGM distill
TRAIN_GFLOPS = {("vosr-0.5b", 256): 1138.7, ("vosr-0.5b", 512): 3641.5, ("vosr-1.4b", 256): 3160.5,
                ("vosr-1.4b", 512): 9815.0}
DISTILL_GFLOPS = {("vosr-0.5b", 256): 3795.8, ("vosr-0.5b", 512): 12138.5, ("vosr-1.4b", 256): 10535.1,
                  ("vosr-1.4b", 512): 32717.2}
PLAN_VARIANTS = 2  # K of the feature set read (configs/cluster/precompute*.yaml)


def trainer_host_peak_bytes(cfg: Any, row_bytes: int, params: int, teacher_params: int = 0) -> int:
    """One training worker's host memory: its shuffle buffer (train.shuffle_buffer rows plus the output block
    being added, train.read_block_mb / 16), the micro-batch decoded to float32 (3 x the stored 16-bit rows:
    the Arrow rows and two float copies) and, at checkpoint time, the model state on the host (weights, EMA,
    two AdamW moments in fp32) plus a frozen teacher's weights."""
    from training.data import READ_OUT_FRACTION
    from training.loop import local_micro_batch

    tc = cfg.train
    micro = local_micro_batch(tc.batch_size, tc.num_workers, tc.grad_accum)
    buffer = tc.shuffle_buffer * row_bytes + (tc.read_block_mb << 20) // READ_OUT_FRACTION
    return buffer + 3 * micro * 2 * row_bytes + STATE_BYTES_PER_PARAM * params + 4 * teacher_params + (1 << 30)


def plan_stages(cfg: Any, images: int, job: str = "pretrain") -> list:
    """`vosr plan` entries of a training job (pretrain or distill) reading the features of `images` images."""
    from jobkit.plan import GPU_EFFECTIVE_FLOPS, Proc, Stage, ceil_div, gib
    from pipelines.features.schema import schema_for_config
    from pipelines.features.writer import schema_row_bytes
    from training.data import read_task_peak_bound
    from vosr.model import count_parameters

    tc = cfg.train
    row = schema_row_bytes(schema_for_config(cfg))
    rows = images * PLAN_VARIANTS
    units = ceil_div(rows, max(1, cfg.precompute.rows_per_shard))
    driver = DRIVER_BASE_BYTES + DRIVER_BYTES_PER_UNIT * units
    counts = count_parameters(cfg)
    params = counts["student_params"] if job == "distill" else counts["dit_params"]
    teacher = counts["dit_params"] if job == "distill" else 0
    block = tc.read_block_mb << 20
    samples = tc.steps * tc.batch_size
    table = DISTILL_GFLOPS if job == "distill" else TRAIN_GFLOPS
    gflops = table.get((cfg.preset, int(cfg.data.resolution)))
    ckpts = ceil_div(tc.steps, tc.checkpoint_every)
    ckpt_bytes = STATE_BYTES_PER_PARAM * params
    gpus = 1 if tc.use_gpu else 0
    return [
        Stage("open_data", [Proc("driver", driver, f"{DRIVER_BYTES_PER_UNIT} B x {units:,} row groups "
                                                   f"(rows_per_shard {cfg.precompute.rows_per_shard}) + "
                                                   f"{gib(DRIVER_BASE_BYTES)} base", "head")],
              note=f"{rows:,} feature rows (K={PLAN_VARIANTS}) of {gib(row)}"),
        Stage("read", [Proc("task: read block", read_task_peak_bound(block),
                            f"read_task_peak_bound(train.read_block_mb {tc.read_block_mb} MiB)", reserved=True)],
              note=f"{samples / max(1, rows):.2f} epochs"),
        Stage("fit", [Proc("trainer (host)", trainer_host_peak_bytes(cfg, row, params, teacher),
                           f"shuffle_buffer {tc.shuffle_buffer} rows + micro-batch + {STATE_BYTES_PER_PARAM} B x "
                           f"{params / 1e6:,.0f}M params" + (" + teacher" if teacher else ""),
                           "gpu" if gpus else "cpu", gpus=float(gpus))],
              written=ckpts * ckpt_bytes,
              gpu_hours=(samples * gflops * 1e9 / GPU_EFFECTIVE_FLOPS / 3600) if (gflops and gpus) else 0.0,
              note=(f"{gflops:,.0f} GFLOPs per sample x {samples:,} samples; " if gflops else "")
              + f"{ckpts:,} checkpoints of {gib(ckpt_bytes)}"),
    ]
