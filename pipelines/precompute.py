"""Feature precompute job: curated shards in, feature shards out (ARCHITECTURE.md data contracts).

    python pipelines/precompute.py --config configs/precompute/tiny.yaml [--set precompute.variants=4]

Stages, top to bottom:
    plan            list curated shards; skip those whose feature shard is complete (resume); count kept rows
    metadata        build the encoders' identities; write or check `_vosr_features.json`
    read_curated    kept rows (id, image bytes) of the pending shards                    (Ray Data read)
    make_pairs      decode -> per variant seeded crop + Real-ESRGAN degradation           (CPU tasks)
    Encoder         HR latent, LR latent, semantic tokens                                 (actor pool, GPU if any)
    write_shards    one feature shard per curated shard, written atomically when all its rows arrived
    summary         throughput, bytes per sample per column, counts -> summary.json, stdout, MLflow

Sharding is deterministic: curated `shards/part-<key>.parquet` becomes feature `shards/part-<key>.parquet`, rows
sorted by (id, variant). A killed run leaves only complete shards; a re-run skips them and produces the rest.
"""

from __future__ import annotations

import io
import json
import posixpath
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines import curate_schema, feature_schema  # noqa: E402
from pipelines.feature_stages import degrade_and_encode, read_curated, strip_helpers  # noqa: E402
from vosr import storage  # noqa: E402


class FaultInjected(RuntimeError):
    """Raised by precompute.fail_after_shards (tests of resumption)."""


def _basename(uri: str) -> str:
    return posixpath.basename(uri.replace("\\", "/"))


def _shard_uri(out_root: str, name: str) -> str:
    return storage.join(out_root, feature_schema.SHARDS_DIR, name)


# --- stage: plan -------------------------------------------------------------------------------------------------

def plan(cfg) -> dict:
    pcfg, ep = cfg.precompute, cfg.precompute.s3_endpoint_url
    files = curate_schema.shard_files(pcfg.input, ep)
    if not files:
        raise FileNotFoundError(f"no curated shards under {storage.join(pcfg.input, curate_schema.SHARDS_DIR)}")
    done, pending = [], []
    for f in files:
        (done if storage.exists(_shard_uri(pcfg.output, _basename(f)), ep) else pending).append(f)
    if pcfg.max_shards:
        pending = pending[:pcfg.max_shards]
    expected = {}
    for f in pending:
        fs, path = storage.open_fs(f, ep)
        pf = pq.ParquetFile(fs.open_input_file(path))
        curate_schema.check_schema(pf.schema_arrow)
        kept = pf.read(columns=["kept"]).column("kept")
        expected[_basename(f)] = int(pc.sum(kept).as_py() or 0)
    return {"files": files, "done": done, "pending": pending, "expected": expected}


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

def _parquet_bytes(table: pa.Table, cfg) -> bytes:
    buf = io.BytesIO()
    comp = cfg.precompute.compression
    # Dictionary pages only where values repeat: ids/params, and the pixel codec's 8-bit-level latents. On dense
    # float tensors (VAE latents, ViT tokens) a dictionary only adds a page that is thrown away (~25% overhead).
    dict_cols = ["id", "degrade_params"] + (["hr_latent", "lr_latent"] if cfg.autoencoder.name == "pixel" else [])
    pq.write_table(table, buf, compression=None if comp == "none" else comp, use_dictionary=dict_cols,
                   write_statistics=["id", "variant", "seed"], row_group_size=max(1, cfg.precompute.rows_per_shard))
    return buf.getvalue()


def write_shard(cfg, name: str, parts: list[pa.Table], schema: pa.Schema) -> dict:
    """Assemble one shard's rows, sort them, write stats then the shard (the shard's presence marks completion)."""
    ep = cfg.precompute.s3_endpoint_url
    table = pa.concat_tables(parts) if parts else None
    failed: dict[str, int] = {}
    if table is not None:
        errors = table.column("error").to_pylist()
        for e in errors:
            if e:
                failed[e] = failed.get(e, 0) + 1
        table = table.filter(pc.equal(table.column("error"), ""))
        table = table.sort_by([("id", "ascending"), ("variant", "ascending")])
        table = strip_helpers(table).cast(schema)
    else:
        table = schema.empty_table()
    data = _parquet_bytes(table, cfg)
    col_bytes = _column_bytes(data)
    stats = {"shard": name, "rows": table.num_rows, "images": len(set(table.column("id").to_pylist())),
             "failed_rows_by_reason": failed, "bytes": len(data), "column_bytes": col_bytes}
    stem = name[:-len(".parquet")] if name.endswith(".parquet") else name
    storage.write_bytes_atomic(_shard_uri(cfg.precompute.output, f"{stem}.stats.json"),
                               json.dumps(stats, indent=2).encode(), ep)
    storage.write_bytes_atomic(_shard_uri(cfg.precompute.output, name), data, ep)
    return stats


def _column_bytes(data: bytes) -> dict[str, int]:
    """Compressed bytes per column of a Parquet file (sum over row groups)."""
    md = pq.ParquetFile(io.BytesIO(data)).metadata
    out: dict[str, int] = {}
    for rg in range(md.num_row_groups):
        g = md.row_group(rg)
        for c in range(g.num_columns):
            col = g.column(c)
            top = col.path_in_schema.split(".")[0]
            out[top] = out.get(top, 0) + int(col.total_compressed_size)
    return out


def write_shards(ds, cfg, expected: dict[str, int], schema: pa.Schema, log=print) -> list[dict]:
    """Consume the stream; write each shard as soon as all its rows (kept images x K) have arrived."""
    k = int(cfg.precompute.variants)
    want = {name: n * k for name, n in expected.items()}
    buffers: dict[str, list[pa.Table]] = {name: [] for name in want}
    have = dict.fromkeys(want, 0)
    written: list[dict] = []
    t0 = time.perf_counter()

    def flush(name: str) -> None:
        stats = write_shard(cfg, name, buffers.pop(name), schema)
        written.append(stats)
        rows = sum(s["rows"] for s in written)
        dt = time.perf_counter() - t0
        log(f"[precompute] shard {name}: {stats['rows']} rows, {stats['bytes'] / 2**20:.2f} MiB | "
            f"{len(written)}/{len(want)} shards, {rows} rows, {rows / max(dt, 1e-9):.2f} rows/s")
        limit = cfg.precompute.fail_after_shards
        if limit and len(written) >= limit:
            raise FaultInjected(f"fault injection: aborting after {len(written)} shard(s)")

    for name in [n for n, w in want.items() if w == 0]:  # shards with no kept rows still get written (resume)
        flush(name)
    if any(w > 0 for w in want.values()):
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if batch.num_rows == 0:
                continue
            srcs = batch.column("src").to_pylist()
            for name in sorted({_basename(s) for s in srcs}):
                mask = pa.array([_basename(s) == name for s in srcs])
                part = batch.filter(mask)
                if name not in buffers:
                    raise RuntimeError(f"row of unexpected shard {name}")
                buffers[name].append(part)
                have[name] += part.num_rows
                if have[name] >= want[name]:
                    flush(name)
    missing = sorted(buffers)
    if missing:
        raise RuntimeError(f"stream ended before shards {missing} were complete")
    return written


# --- job ---------------------------------------------------------------------------------------------------------

def run(cfg, log=print) -> dict:
    from pipelines.ray_env import init_ray

    if cfg.precompute.mode != "materialize":
        raise ValueError("precompute.mode=online writes nothing; use pipelines.online.online_dataset(cfg) from the "
                         "training job instead")
    t_start = time.perf_counter()
    p = plan(cfg)
    log(f"[precompute] {len(p['files'])} curated shards: {len(p['done'])} already done, "
        f"{len(p['pending'])} to process ({sum(p['expected'].values())} kept images x {cfg.precompute.variants})")
    ae_id, sem_id = encoder_identities(cfg)
    meta = ensure_metadata(cfg, ae_id, sem_id)
    schema = feature_schema.schema_for_config(cfg)
    written: list[dict] = []
    if p["pending"]:
        init_ray(cfg)
        import ray.data

        ray.data.DataContext.get_current().execution_options.preserve_order = True  # shards finish in order
        ds = read_curated(p["pending"], cfg.precompute.s3_endpoint_url)
        ds = degrade_and_encode(ds, cfg, list(range(cfg.precompute.variants)))
        written = write_shards(ds, cfg, p["expected"], schema, log)
    wall = time.perf_counter() - t_start
    summary = summarize(cfg, p, written, meta, wall)
    storage.write_bytes_atomic(storage.join(cfg.precompute.output, feature_schema.SUMMARY_FILE),
                               json.dumps(summary, indent=2).encode(), cfg.precompute.s3_endpoint_url)
    if cfg.run.mlflow.enabled:
        log_mlflow(cfg, summary)
    return summary


def summarize(cfg, p: dict, written: list[dict], meta: dict, wall: float) -> dict:
    rows = sum(s["rows"] for s in written)
    images = sum(s["images"] for s in written)
    failed: dict[str, int] = {}
    col_bytes: dict[str, int] = {}
    for s in written:
        for r, n in s["failed_rows_by_reason"].items():
            failed[r] = failed.get(r, 0) + n
        for c, n in s["column_bytes"].items():
            col_bytes[c] = col_bytes.get(c, 0) + n
    raw = feature_schema.bytes_per_variant(tuple(meta["latent_shape"]), tuple(meta["sem_shape"]), meta["dtype"])
    return {
        "output": cfg.precompute.output,
        "shards_total": len(p["files"]), "shards_skipped": len(p["done"]), "shards_written": len(written),
        "images": images, "rows": rows, "variants": int(cfg.precompute.variants),
        "failed_rows_by_reason": failed,
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
    import mlflow

    from vosr.tracking import setup_mlflow

    setup_mlflow(cfg)
    with mlflow.start_run(run_name=f"{cfg.run.name}-precompute"):
        params = {f"precompute.{k}": v for k, v in vars(cfg.precompute).items()}
        params.update({"preset": cfg.preset, "data.resolution": cfg.data.resolution,
                       "autoencoder.name": cfg.autoencoder.name, "semantic.name": cfg.semantic.name,
                       "degrade.preset": cfg.degrade.preset, "run.seed": cfg.run.seed})
        mlflow.log_params(params)
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))
                            and not isinstance(v, bool) and v is not None})
        mlflow.log_dict(summary, "precompute_summary.json")


def main(argv: list[str] | None = None) -> int:
    from vosr.jobargs import parse_job_args

    cfg, _ = parse_job_args("Precompute VOSR features (HR latents, K LR variants with semantic tokens).", argv,
                            writes=["precompute.output"])
    try:
        summary = run(cfg)
    except (FileNotFoundError, feature_schema.FeatureMismatchError) as exc:
        print(f"precompute error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
