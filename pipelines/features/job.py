"""The feature precompute job's driver (its entry point and stage list: pipelines/precompute.py): plan the
pending shards, write or check the dataset metadata, stream read -> degrade -> encode -> write parts, merge the
parts into shards as they complete (pipelines/features/writer.py), summarise; and `plan_stages`, the job's
memory, storage and compute bounds for `vosr plan`. The data contract is pipelines/features/schema.py.
"""

from __future__ import annotations

import json
import time

from jobkit.faults import FaultInjected
from pipelines import curate_schema
from pipelines.features import schema as feature_schema
from pipelines.features import writer as feature_writer
from pipelines.features.stages import degrade_and_encode, read_curated
from vosr import storage

_basename = feature_writer.basename


# --- stage: plan -------------------------------------------------------------------------------------------------

PLAN_FILES_PER_TASK = 64  # curated shards whose kept rows one planning task counts


def plan(cfg, start_ray=None) -> dict:
    """Pending shards from one listing of each side; kept rows per pending shard counted from the `kept` column,
    in Ray tasks of PLAN_FILES_PER_TASK files when there are more (`start_ray()` starts or joins Ray first;
    without it they are counted here, one file after the other)."""
    pcfg, ep = cfg.precompute, cfg.precompute.s3_endpoint_url
    files = curate_schema.shard_files(pcfg.input, ep)
    if not files:
        raise FileNotFoundError(f"no curated shards under {storage.join(pcfg.input, curate_schema.SHARDS_DIR)}")
    finished = {_basename(f) for f in feature_writer.shard_files(pcfg.output, ep)}
    done = [f for f in files if _basename(f) in finished]
    pending = [f for f in files if _basename(f) not in finished]
    if pcfg.max_shards:
        pending = pending[:pcfg.max_shards]
    return {"files": files, "done": done, "pending": pending,
            "expected": _count_expected(pending, ep, start_ray)}


def _count_expected(pending: list[str], ep: str, start_ray) -> dict[str, int]:
    chunks = [pending[i:i + PLAN_FILES_PER_TASK] for i in range(0, len(pending), PLAN_FILES_PER_TASK)]
    if start_ray is None or len(chunks) <= 1:
        return {k: v for c in chunks for k, v in feature_writer.count_kept(c, ep).items()}
    import ray

    start_ray()
    task = ray.remote(num_cpus=0.25)(feature_writer.count_kept)
    expected: dict[str, int] = {}
    for part in ray.get([task.remote(c, ep) for c in chunks]):
        expected.update(part)
    return expected


# --- stage: metadata ---------------------------------------------------------------------------------------------

def encoder_identities(cfg) -> tuple[dict, dict]:
    from vosr.encoders import build_autoencoder, build_semantic_encoder

    return build_autoencoder(cfg.autoencoder).identity(), build_semantic_encoder(cfg.semantic).identity()


def ensure_metadata(cfg, ae_id: dict, sem_id: dict) -> dict:
    """Write `_vosr_features.json`, or check that an existing one (a resumed run) matches this config exactly."""
    pcfg, ep = cfg.precompute, cfg.precompute.s3_endpoint_url
    meta = feature_schema.build_metadata(cfg, ae_id, sem_id)
    uri = storage.join(pcfg.output, feature_schema.META_FILE)
    if storage.exists(uri, ep):
        old = feature_schema.read_metadata(pcfg.output, ep)
        feature_schema.check_compatible(old, cfg, ae_id, sem_id)
        for key in ("variants", "dtype", "seed", "degrade", "sample_posterior"):
            if old.get(key) != meta.get(key):
                raise feature_schema.FeatureMismatchError(
                    f"{pcfg.output} already holds features made with {key}={old.get(key)!r}; this run asks for "
                    f"{meta.get(key)!r}. Use another precompute.output (shards of both would mix).")
        return old
    feature_schema.write_metadata(pcfg.output, meta, ep)
    return meta


# --- stage: write_shards -----------------------------------------------------------------------------------------
# The rows are written by Ray tasks (pipelines/features/writer.py); the driver reads only the part summaries (shard,
# part uri, row count), launches one merge task per shard whose rows have all arrived, and adds up their stats.

class ShardTotals:
    """Running totals over the finished shards' stats (rows, images, failed rows by reason, bytes per column) and
    the progress line: each shard adds its stats once, so the driver's work and memory per finished shard stay
    constant (no list of every shard's stats, no sum over them per progress line)."""

    def __init__(self, shards_expected: int = 0, rows_expected: int = 0):
        self.shards_expected, self.rows_expected = shards_expected, rows_expected
        self.shards = self.rows = self.images = self.bytes = self.failed_total = 0
        self.failed: dict[str, int] = {}
        self.column_bytes: dict[str, int] = {}
        self.last: dict = {}

    def add(self, stats: dict) -> None:
        self.shards += 1
        self.rows += int(stats["rows"])
        self.images += int(stats["images"])
        self.bytes += int(stats["bytes"])
        for reason, n in stats["failed_rows_by_reason"].items():
            self.failed[reason] = self.failed.get(reason, 0) + n
            self.failed_total += n
        for c, n in stats["column_bytes"].items():
            self.column_bytes[c] = self.column_bytes.get(c, 0) + n
        self.last = stats

    def line(self, seconds: float) -> str:
        """The progress line after the last added shard: rows done (written + failed), rate, ETA."""
        s = self.last
        done = self.rows + self.failed_total
        rate = done / max(seconds, 1e-9)
        eta = (self.rows_expected - done) / rate if rate > 0 else float("nan")
        return (f"[precompute] shard {s.get('shard')}: {s.get('rows')} rows, {s.get('bytes', 0) / 2**20:.2f} MiB | "
                f"{self.shards}/{self.shards_expected} shards, {done}/{self.rows_expected} rows, {rate:.2f} rows/s, "
                f"ETA {eta:.0f} s")


def write_shards(ds, cfg, expected: dict[str, int], log=print) -> ShardTotals:
    """Run the stream (ending in write_parts tasks); merge each shard as soon as all its rows (kept images x K)
    are in parts. Shards finish in any order. With fail_after_shards=N only the first N pending shards (plan
    order) are merged, then the run aborts (tests of resumption)."""
    import ray

    from jobkit.ray_env import memory_reservation

    k = int(cfg.precompute.variants)
    want = {name: n * k for name, n in expected.items()}
    limit = int(cfg.precompute.fail_after_shards or 0)
    allowed = set(sorted(want)[:limit]) if limit else set(want)
    parts: dict[str, list[str]] = {name: [] for name in want}
    have = dict.fromkeys(want, 0)
    settings = feature_writer.writer_settings(cfg)
    finalize = ray.remote(num_cpus=0.5, max_retries=2)(feature_writer.finalize_shard)
    running: dict = {}
    launched: set[str] = set()
    t0 = time.perf_counter()
    totals = ShardTotals(len(want), sum(want.values()))

    row_bytes = feature_writer.schema_row_bytes(settings["schema"])

    def launch(name: str) -> None:
        launched.add(name)
        # the streamed merge's stated peak (a few output row groups, not the shard) is its memory reservation
        mem = memory_reservation(feature_writer.merge_task_peak_bytes(settings["row_group_size"], row_bytes,
                                                                      want[name]))
        running[finalize.options(**({"memory": mem} if mem else {})).remote(settings, name, parts.pop(name))] = name

    def collect(timeout: float | None) -> None:
        if not running:
            return
        ready, _ = ray.wait(list(running), num_returns=len(running), timeout=timeout)
        for ref in ready:
            running.pop(ref)
            totals.add(ray.get(ref))
            log(totals.line(time.perf_counter() - t0))

    for name in sorted(n for n, w in want.items() if w == 0 and n in allowed):  # empty shards are written too
        launch(name)
    if any(w > 0 for w in want.values()) and not (limit and launched >= allowed):
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):  # part summaries only
            for name, uri, n in zip(batch.column("shard").to_pylist(), batch.column("part").to_pylist(),
                                    batch.column("rows").to_pylist()):
                if name not in have:
                    raise RuntimeError(f"row of unexpected shard {name}")
                have[name] += n
                if have[name] > want[name]:
                    raise RuntimeError(f"shard {name}: {have[name]} rows arrived, {want[name]} expected")
                if name in parts:
                    parts[name].append(uri)
                if have[name] == want[name] and name in allowed:
                    launch(name)
            collect(timeout=0)
            if limit and launched >= allowed:
                break  # fault injection: stop streaming once the allowed shards are in
    collect(timeout=None)
    if limit and totals.shards >= limit:
        raise FaultInjected(f"fault injection: aborting after {totals.shards} shard(s)")
    missing = sorted(n for n in want if n not in launched)
    if missing:
        raise RuntimeError(f"stream ended before shards {missing} were complete")
    return totals


# --- job ---------------------------------------------------------------------------------------------------------


def run(cfg, log=print) -> dict:
    from jobkit.ray_env import init_ray

    if cfg.precompute.mode != "materialize":
        raise ValueError("precompute.mode=online writes nothing; use pipelines.features.online.online_dataset(cfg) from the "
                         "training job instead")
    t_start = time.perf_counter()
    p = plan(cfg, start_ray=lambda: init_ray(cfg))
    log(f"[precompute] {len(p['files'])} curated shards: {len(p['done'])} already done, "
        f"{len(p['pending'])} to process ({sum(p['expected'].values())} kept images x {cfg.precompute.variants})")
    ae_id, sem_id = encoder_identities(cfg)
    meta = ensure_metadata(cfg, ae_id, sem_id)
    totals = ShardTotals()
    if p["pending"]:
        init_ray(cfg)
        ds = read_curated(p["pending"], cfg.precompute.s3_endpoint_url)
        ds = degrade_and_encode(ds, cfg, list(range(cfg.precompute.variants)))
        # rows never come back to the driver: each batch is written as parts by a task; shards merge in tasks
        from jobkit.ray_env import memory_reservation

        row = feature_writer.schema_row_bytes(feature_schema.schema_for_config(cfg))
        mem = memory_reservation(feature_writer.write_parts_peak_bytes(cfg.precompute.batch_size, row))
        ds = ds.map_batches(feature_writer.write_parts, fn_kwargs={"output": cfg.precompute.output,
                                                                   "endpoint_url": cfg.precompute.s3_endpoint_url,
                                                                   "row_group_size": cfg.precompute.rows_per_shard},
                            batch_format="pyarrow", batch_size=None, zero_copy_batch=True, num_cpus=0.25,
                            **({"memory": mem} if mem else {}))
        totals = write_shards(ds, cfg, p["expected"], log)
    if len(p["done"]) + totals.shards == len(p["files"]):
        feature_writer.remove_parts(cfg.precompute.output, "", cfg.precompute.s3_endpoint_url)  # stale leftovers
    wall = time.perf_counter() - t_start
    summary = summarize(cfg, p, totals, meta, wall)
    storage.write_bytes_atomic(storage.join(cfg.precompute.output, feature_schema.SUMMARY_FILE),
                               json.dumps(summary, indent=2).encode(), cfg.precompute.s3_endpoint_url)
    if cfg.run.mlflow.enabled:
        log_mlflow(cfg, summary)
    return summary


def summarize(cfg, p: dict, totals: ShardTotals, meta: dict, wall: float) -> dict:
    rows, images, col_bytes = totals.rows, totals.images, totals.column_bytes
    raw = feature_schema.bytes_per_variant(tuple(meta["latent_shape"]), tuple(meta["sem_shape"]), meta["dtype"])
    return {
        "output": cfg.precompute.output,
        "shards_total": len(p["files"]), "shards_skipped": len(p["done"]), "shards_written": totals.shards,
        "images": images, "rows": rows, "variants": int(cfg.precompute.variants),
        "failed_rows_by_reason": dict(totals.failed),
        "wall_s": round(wall, 3),
        "images_per_s": round(images / wall, 3) if wall > 0 else None,
        "rows_per_s": round(rows / wall, 3) if wall > 0 else None,
        "stored_bytes_per_row_by_column": {c: round(n / rows, 1) for c, n in sorted(col_bytes.items())} if rows
        else {},
        "raw_bytes_per_row_by_column": raw,
        "raw_bytes_per_image": sum(raw.values()) * int(cfg.precompute.variants),
        "latent_shape": meta["latent_shape"], "sem_shape": meta["sem_shape"], "dtype": meta["dtype"],
        "autoencoder": meta["autoencoder"].get("name"), "semantic": meta["semantic"].get("name"),
    }


def log_mlflow(cfg, summary: dict) -> None:
    from jobkit.tracking import log_job_run

    params = {f"precompute.{k}": v for k, v in vars(cfg.precompute).items()}
    params.update({"preset": cfg.preset, "data.resolution": cfg.data.resolution,
                   "autoencoder.name": cfg.autoencoder.name, "semantic.name": cfg.semantic.name,
                   "degrade.preset": cfg.degrade.preset, "run.seed": cfg.run.seed})
    log_job_run(cfg, "precompute", params, summary)


# --- vosr plan ---------------------------------------------------------------------------------------------------
# Assumptions and measured constants of the precompute plan (docs/scale.md explains each).

PLAN_KEPT_PER_SHARD = 1638  # kept images per curated shard: 4,096 rows (configs/cluster/curate.yaml) x 40% kept
DRIVER_BASE_BYTES = 1 << 30  # driver RSS with Ray and the job's imports: 672-762 MiB measured before a run, peak
#                             899-989 MiB at 2k-20k images (benchmarks/bench_scale_precompute.py, docs/scale.md)
DRIVER_BYTES_PER_SHARD = 32 << 10  # the plan's file lists, per-shard counters and part URIs, and Ray Data's per-task
#   state for each curated shard read. Measured (benchmarks/bench_memory_reads.py --only precompute-driver
#   --driver-per-shard 10): driver peak 976.1 / 981.9 / 985.6 MiB at 50 / 200 / 400 shards, ~19-40 KB per shard
DEGRADE_CPU_S_512 = {"realesrgan": 0.2, "bicubic": 0.01}  # CPU-s per variant at 512 px (bench_degrade.py:
#                                                          >= 5 images/s/core); scaled by (resolution / 512)^2
# Encoder GFLOPs per variant (VAE encode of HR and LR + DINOv2 forward; benchmarks/flops.py, docs/scale.md s3)
ENCODER_GFLOPS = {("sd21", "dinov2_vitb14", 256): 706.0, ("sd21", "dinov2_vitb14", 512): 2393.9,
                  ("qwen2d", "dinov2_vitl14", 256): 1418.7, ("qwen2d", "dinov2_vitl14", 512): 4084.7}


def plan_stages(cfg, images: int) -> list:
    """`vosr plan` entries of the precompute job for `images` kept images (jobkit/plan.py)."""
    from jobkit.plan import GPU_EFFECTIVE_FLOPS, Proc, Stage, ceil_div, gib, hours
    from pipelines.features import stages as fst

    pc, res, k = cfg.precompute, int(cfg.data.resolution), int(cfg.precompute.variants)
    schema = feature_schema.schema_for_config(cfg)
    row = feature_writer.schema_row_bytes(schema)
    shards = ceil_div(images, PLAN_KEPT_PER_SHARD)
    rows = images * k
    driver = DRIVER_BASE_BYTES + DRIVER_BYTES_PER_SHARD * shards
    gpus = pc.num_gpus_per_encoder
    weights = fst.ENCODER_WEIGHT_BYTES.get(cfg.autoencoder.name, 0) + fst.ENCODER_WEIGHT_BYTES.get(cfg.semantic.name, 0)
    merge = feature_writer.merge_task_peak_bytes(pc.rows_per_shard, row, PLAN_KEPT_PER_SHARD * k)
    gflops = ENCODER_GFLOPS.get((cfg.autoencoder.name, cfg.semantic.name, res))
    degrade_s = DEGRADE_CPU_S_512.get(cfg.degrade.preset, 0.2) * (res / 512) ** 2
    d = f"{DRIVER_BYTES_PER_SHARD} B x {shards:,} shards + {gib(DRIVER_BASE_BYTES)} base"
    return [
        Stage("plan", [Proc("driver", driver, d, "head"),
                       Proc("task: count kept", 64 * 4096 + (64 << 20), "64 shards' kept columns + 64 MiB")]),
        Stage("read_curated", [Proc("task: read shard", fst.read_task_peak_bytes(cfg.curate.crawl.max_bytes),
                                    f"2 x {fst.READ_BATCH_ROWS} rows x crawl.max_bytes "
                                    f"{gib(cfg.curate.crawl.max_bytes)} + 16 MiB")]),
        Stage("make_pairs", [Proc("task: degrade", fst.degrade_task_peak_bytes(pc.degrade_batch_size, k, res,
                                                                                cfg.curate.filters.max_pixels),
                                  f"decode at filters.max_pixels x {fst.DECODE_BYTES_PER_PIXEL} B + "
                                  f"{pc.degrade_batch_size} images x {k} variants of {res} px pairs x 2",
                                  reserved=True)],
              cpu_hours=hours(rows * degrade_s), note=f"{degrade_s:.3f} CPU-s per variant ({cfg.degrade.preset})"),
        Stage("encode", [Proc("actor: encoder", fst.encoder_peak_bytes(pc.batch_size, res, row, weights),
                              f"weights {gib(weights)} + {fst.ENCODER_BATCH_COPIES} x {pc.batch_size} rows",
                              "gpu" if gpus else "cpu", reserved=True, gpus=float(pc.num_gpus_per_encoder))],
              gpu_hours=(rows * gflops * 1e9 / GPU_EFFECTIVE_FLOPS / 3600) if (gflops and gpus) else 0.0,
              note=(f"{gflops:,.0f} GFLOPs per variant" if gflops else "encoder FLOPs not tabled for this preset")),
        Stage("write_parts", [Proc("task: write parts", feature_writer.write_parts_peak_bytes(pc.batch_size, row),
                                   f"3 x {pc.batch_size} rows x {gib(row)}", reserved=True)],
              written=rows * row, note="transient part files, removed once their shard is merged"),
        Stage("write_shards", [Proc("driver", driver, d, "head"),
                               Proc("task: merge", merge,
                                    f"merge_task_peak_bytes: 10 x rows_per_shard {pc.rows_per_shard} x {gib(row)} "
                                    f"+ 4.25 KiB x {PLAN_KEPT_PER_SHARD * k:,} rows + 88 MiB", reserved=True)],
              written=rows * row, note=f"{shards:,} shards of {PLAN_KEPT_PER_SHARD * k:,} rows"),
    ]
