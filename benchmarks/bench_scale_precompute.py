"""Precompute at growing sizes: driver peak RSS and seconds per size (docs/scale.md s5).

    .venv/bin/python benchmarks/bench_scale_precompute.py [--sizes 2000 6000 20000] [--variants 1]
        [--degrade bicubic] [--per-shard 500] [--cpus 2] [--compare-root /work/main]

Target: the driver's peak RSS stays flat (within 10%) from 2k to 20k rows, because no row byte reaches
the driver (pipelines/features/writer.py). Each size runs the real job (`pipelines.features.job.run`, tiny preset,
local Ray with --cpus CPUs) in a fresh child process that samples its own RSS (/proc/self/status, every 20 ms)
from just before the run to its end; Ray's start-up is outside the timer. Input: synthetic curated shards of
distinct 64x64 PNGs (smooth random fields; --per-shard rows per curated shard, so the number of shards grows with
the size). To keep 20k images feasible on 2 CPUs the default is K=1 variant per image and the bicubic x4
degradation instead of the second-order Real-ESRGAN one; both are flags.

--compare-root runs the same sizes with another checkout's code (--only-compare: only that code) (e.g. main, whose driver assembles every shard)
and checks at the smallest size that both wrote the same rows. `bench_precompute_scale(...)` is the entry point
for benchmarks/bench_scale.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --- input ---------------------------------------------------------------------------------------------------------

def make_curated(root: Path, n: int, per_shard: int, seed: int = 0) -> int:
    """n distinct smooth 64x64 RGB PNGs as curated shards (pipelines/curate_schema.py layout)."""
    import cv2
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT))
    from pipelines.curate_schema import CURATED_SCHEMA

    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, n, per_shard)):
        rows = []
        for i in range(start, min(n, start + per_shard)):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = cv2.resize(small, (64, 64), interpolation=cv2.INTER_CUBIC)
            img = np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
            ok, buf = cv2.imencode(".png", img)
            assert ok
            rows.append({"id": f"img{i:08d}", "source": f"synthetic://{i}", "image": buf.tobytes(),
                         "format": "png", "width": 64, "height": 64, "kept": True})
        pq.write_table(pa.Table.from_pylist(rows, schema=CURATED_SCHEMA),
                       root / "shards" / f"part-{s:05d}.parquet")
    return n


# --- child: one run, RSS sampled in-process ----------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    import threading

    sys.path.insert(0, args.code_root)
    from jobkit.config import load_config
    from jobkit.ray_env import init_ray
    from pipelines.features.job import run

    cfg = load_config(Path(args.code_root) / "configs/precompute/tiny.yaml", [
        f"precompute.input={args.input}", f"precompute.output={args.output}",
        f"precompute.variants={args.variants}", f"degrade.preset={args.degrade}", "run.mlflow.enabled=false",
        f"run.ray.num_cpus={args.cpus}", "run.ray.object_store_memory_mb=400", "precompute.batch_size=64",
        "precompute.degrade_batch_size=32"])
    init_ray(cfg)
    import ray.data  # noqa: F401  (imported before the baseline, as the run would)

    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    summary = run(cfg, log=lambda s: None)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], _rss_bytes())
    print("RESULT " + json.dumps({"rows": summary["rows"], "images": summary["images"],
                                  "shards": summary["shards_written"], "wall_s": round(wall, 2),
                                  "stored_bytes_per_row": round(sum(summary["stored_bytes_per_row_by_column"].values()),
                                                                1),
                                  "base_rss_mib": round(base / 2**20, 1), "peak_rss_mib": round(peak[0] / 2**20, 1)}))


def _run_child(code_root: str, curated: Path, out: Path, variants: int, degrade: str, cpus: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--code-root", code_root, "--input", str(curated),
           "--output", str(out), "--variants", str(variants), "--degrade", degrade, "--cpus", str(cpus)]
    env = dict(os.environ, PYTHONPATH=code_root, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code_root)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _same_rows(a: Path, b: Path) -> tuple[bool, str]:
    import numpy as np
    import pyarrow.parquet as pq

    fa, fb = sorted((a / "shards").glob("*.parquet")), sorted((b / "shards").glob("*.parquet"))
    if [f.name for f in fa] != [f.name for f in fb]:
        return False, "different shard names"
    worst = 0.0
    for x, y in zip(fa, fb):
        ta, tb = pq.read_table(x), pq.read_table(y)
        if ta.num_rows != tb.num_rows or ta.schema.names != tb.schema.names:
            return False, f"{x.name}: rows or columns differ"
        for col in ta.schema.names:
            if col == "sem_tokens":  # float ViT output: may differ in the last bits with the batch composition
                va = np.asarray(ta.column(col).combine_chunks().flatten(), np.float32)
                vb = np.asarray(tb.column(col).combine_chunks().flatten(), np.float32)
                worst = max(worst, float(np.abs(va - vb).max()) if va.size else 0.0)
            elif ta.column(col).to_pylist() != tb.column(col).to_pylist():
                return False, f"{x.name}: column {col} differs"
    return worst <= 2e-3, f"{len(fa)} shards; all columns equal, sem_tokens max |diff| {worst:.2g}"


def bench_precompute_scale(sizes=(2000, 6000, 20000), variants: int = 1, degrade: str = "bicubic",
                           per_shard: int = 500, cpus: int = 2, compare_root: str = "", include_this: bool = True,
                           log=print) -> dict:
    """Run precompute at each size (fresh child process each); return and print per-size driver peak RSS and
    seconds, the peak-RSS ratio largest/smallest and its growth exponent (log ratio / log size ratio)."""
    roots = {"this": str(ROOT)} if include_this else {}
    if compare_root:
        roots["compare"] = str(Path(compare_root).resolve())
    res: dict = {"sizes": list(sizes), "variants": variants, "degrade": degrade, "per_shard": per_shard,
                 "cpus": cpus, "runs": {k: [] for k in roots}}
    with tempfile.TemporaryDirectory(prefix="bench-scale-pre-") as tmp:
        for n in sizes:
            curated = Path(tmp) / f"curated-{n}"
            make_curated(curated, n, per_shard)
            outs = {}
            for label, code in roots.items():
                outs[label] = Path(tmp) / f"features-{label}-{n}"
                r = _run_child(code, curated, outs[label], variants, degrade, cpus)
                r["size"] = n
                res["runs"][label].append(r)
                log(f"[{label}] {n} images: {r['rows']} rows in {r['wall_s']} s ({r['rows'] / r['wall_s']:.1f} "
                    f"rows/s), driver RSS base {r['base_rss_mib']} MiB, peak {r['peak_rss_mib']} MiB")
            if len(outs) == 2 and n == min(sizes):
                ok, why = _same_rows(outs["this"], outs["compare"])
                res["same_rows_as_compare"] = {"ok": ok, "detail": why}
                log(f"[compare] same rows at {n}: {ok} ({why})")
            for o in outs.values():
                subprocess.run(["rm", "-rf", str(o)], check=False)
            subprocess.run(["rm", "-rf", str(curated)], check=False)
    for label, runs in res["runs"].items():
        lo, hi = runs[0], runs[-1]
        ratio = hi["peak_rss_mib"] / lo["peak_rss_mib"]
        growth = (hi["peak_rss_mib"] - hi["base_rss_mib"]) / max(1e-9, lo["peak_rss_mib"] - lo["base_rss_mib"])
        expo = math.log(ratio) / math.log(hi["size"] / lo["size"]) if hi["size"] != lo["size"] else float("nan")
        res[f"{label}_peak_rss_ratio"] = round(ratio, 3)
        res[f"{label}_peak_rss_exponent"] = round(expo, 3)
        res[f"{label}_rss_above_base_ratio"] = round(growth, 2)
        res[f"{label}_flat_within_10pct"] = ratio <= 1.10
        log(f"[{label}] driver peak RSS {hi['size']}/{lo['size']} images: x{ratio:.3f} (exponent {expo:.3f}; RSS "
            f"above the pre-run baseline x{growth:.2f}); target <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 6000, 20000])
    ap.add_argument("--variants", type=int, default=1)
    ap.add_argument("--degrade", default="bicubic", choices=["bicubic", "realesrgan"])
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--compare-root", default="")
    ap.add_argument("--only-compare", action="store_true", help="run only the --compare-root code")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code-root", default=str(ROOT), help=argparse.SUPPRESS)
    ap.add_argument("--input", default="", help=argparse.SUPPRESS)
    ap.add_argument("--output", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    res = bench_precompute_scale(tuple(sorted(args.sizes)), args.variants, args.degrade, args.per_shard, args.cpus,
                                 args.compare_root, not args.only_compare)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
