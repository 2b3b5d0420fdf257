"""Precompute throughput with the tiny preset (measured) and bytes per sample per column (measured for tiny,
computed from shapes for vosr-0.5b and vosr-1.4b).

    .venv/bin/python benchmarks/bench_precompute.py [--images 44] [--variants 2] [--cpus 2] [--input CURATED_ROOT]

Without --input it writes curated shards (pipelines/curate_schema.py layout) from the real photos first. Ray is
started before the timer, so the throughput excludes Ray's start-up but includes actor start-up. CPU only here:
for a GPU number, run it on a GPU machine with --set-style overrides of configs/precompute/vosr-0.5b.yaml (weights
needed) -- the shape-based storage numbers below do not need any weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from photos import photo_paths  # noqa: E402  (benchmarks/photos.py)

from jobkit.config import config_from_dict, load_config  # noqa: E402
from pipelines.curate_schema import CURATED_SCHEMA  # noqa: E402
from pipelines.features import schema as fsch  # noqa: E402


def write_curated(root: Path, n: int, per_shard: int) -> int:
    paths = photo_paths()[:n]
    rows = []
    for p in paths:
        data = p.read_bytes()
        rows.append({"id": hashlib.sha256(data).hexdigest()[:16], "source": str(p), "image": data,
                     "format": p.suffix.lstrip(".").lower(), "kept": True})
    (root / "shards").mkdir(parents=True, exist_ok=True)
    for i in range(0, len(rows), per_shard):
        pq.write_table(pa.Table.from_pylist(rows[i:i + per_shard], schema=CURATED_SCHEMA),
                       root / "shards" / f"part-{i // per_shard:05d}.parquet")
    return len(rows)


def computed_storage(preset: str, variants: int) -> dict:
    cfg = config_from_dict({"preset": preset, "precompute": {"variants": variants}})
    lat, sem = fsch.latent_shape(cfg), fsch.sem_shape(cfg)
    out = {"latent_shape": list(lat), "sem_shape": list(sem)}
    for dtype in ("float16", "bfloat16"):
        per = fsch.bytes_per_variant(lat, sem, dtype)
        row = sum(per.values())
        out[dtype] = {"bytes_per_variant_by_column": per, "bytes_per_variant": row,
                      "MiB_per_image_K": round(row * variants / 2**20, 3),
                      "TiB_per_100M_images_K": round(row * variants * 1e8 / 2**40, 1),
                      "sem_tokens_share": round(per["sem_tokens"] / row, 3)}
    out["note"] = ("raw tensor bytes; HR latent stored per variant because each variant has its own crop; "
                   "dense fp16/bf16 features compress little (see tiny's measured stored bytes)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=44)
    ap.add_argument("--variants", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--per-shard", type=int, default=8)
    ap.add_argument("--input", default="")
    args = ap.parse_args(argv)

    from jobkit.ray_env import init_ray
    from pipelines.features.job import run

    with tempfile.TemporaryDirectory() as tmp:
        curated = Path(args.input) if args.input else Path(tmp) / "curated"
        n = write_curated(curated, args.images, args.per_shard) if not args.input else None
        cfg = load_config(ROOT / "configs/precompute/tiny.yaml", [
            f"precompute.input={curated}", f"precompute.output={Path(tmp) / 'features'}",
            f"precompute.variants={args.variants}", "run.mlflow.enabled=false",
            f"run.ray.num_cpus={args.cpus}", "run.ray.object_store_memory_mb=500"])
        init_ray(cfg)
        t0 = time.perf_counter()
        summary = run(cfg, log=lambda s: print(s, file=sys.stderr))
        wall = time.perf_counter() - t0
    res = {
        "machine_note": f"{args.cpus} Ray CPUs on a shared machine; other jobs compete for the cores",
        "tiny": {"images_in": n, "images": summary["images"], "rows": summary["rows"],
                 "variants": args.variants, "wall_s_excluding_ray_start": round(wall, 2),
                 "images_per_s": round(summary["images"] / wall, 2), "rows_per_s": round(summary["rows"] / wall, 2),
                 "stored_bytes_per_row_by_column": summary["stored_bytes_per_row_by_column"],
                 "raw_bytes_per_row_by_column": summary["raw_bytes_per_row_by_column"],
                 "failed_rows_by_reason": summary["failed_rows_by_reason"]},
        "vosr-0.5b_computed": computed_storage("vosr-0.5b", args.variants),
        "vosr-1.4b_computed": computed_storage("vosr-1.4b", args.variants),
    }
    res["tiny"]["stored_bytes_per_image"] = round(
        sum(res["tiny"]["stored_bytes_per_row_by_column"].values()) * args.variants, 1)
    print(json.dumps(res, indent=2))
    assert math.isfinite(res["tiny"]["images_per_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
