"""Peak memory per process kind of the precompute job and of training reads, at three sizes, with the slope in
bytes per row (the corpus must not show up in any process's peak), and the precompute progress loop's cost.

    .venv/bin/python benchmarks/bench_memory_reads.py [--only progress training-read merge precompute-driver]
        [--progress-shards 6000 20000 60000]
        [--read-rows 256 1024 2048] [--read-targets-mib 128 256 512] [--read-target-mib 512] [--group-rows 64]
        [--sem-tokens 1024] [--compare-root /work/main] [--plan-units 100000 400000 800000]
        [--merge-rows 512 2048 4096] [--merge-group-rows 64]
        [--driver-sizes 500 2000 4000] [--driver-per-shard 100]

Sections (each prints its own lines; --only picks some; all run by default):

progress           precompute's progress line over N finished shards (pipelines/features/job.ShardTotals, one
                   add + line per shard) at each --progress-shards, seconds per shard (flat = linear), and the sum
                   the line made before (over every written shard for every finished one) for comparison.
training-plan      the training driver's read plan of one epoch (training/data.mixed_shards_datasource and its
                   get_read_tasks) over --plan-units row groups (footers stubbed): its RSS growth and the slope in
                   bytes per row group (training.job.DRIVER_BYTES_PER_UNIT, used by `vosr plan`).
training-read      a read task of training's feature reads (training/data.py mixed_shards_datasource, the real
                   read functions) over synthetic feature shards shaped like vosr-0.5b at 512 px (HR/LR latents
                   4x64x64 and 1024 x 768 DINOv2 tokens in bf16: 1.56 MiB a row; --sem-tokens shrinks it), row
                   groups of --group-rows. For each corpus size (--read-rows) a fresh process plans the epoch and
                   runs every read task one after the other, dropping each output block as Ray would after
                   storing it; per task the peak RSS above the RSS before it (VmHWM reset per task). Prints the
                   largest task peak per size, its slope in bytes per corpus row, and the peak against
                   train.read_block_mb at each --read-targets-mib (and the stated read_task_peak_bound).
                   --compare-root: the same with another checkout's code (before: a block of 16 row groups).
merge              one precompute merge task (pipelines/features/writer.merge_parts, real part files) for shards of
                   --merge-rows rows at --merge-group-rows rows per output row group; peak RSS above the RSS before
                   it, against merge_peak_bound, slope in bytes per shard row.
precompute-driver  the real precompute job (benchmarks/bench_scale_precompute.py, tiny preset, K=1, bicubic) at
                   --driver-sizes images, --driver-per-shard rows per curated shard: the driver's peak RSS and its
                   slope in bytes per image.

Synthetic data goes to a temporary folder (training-read: rows x 1.56 MiB at the largest size, ~3.2 GB by
default). CPU only. Wrap in `flock /tmp/vosr-heavy.lock` on a shared machine.
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
sys.path.insert(0, str(ROOT))

MiB = 2**20


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


# --- progress ------------------------------------------------------------------------------------------------------

def _stats(i: int) -> dict:
    return {"shard": f"part-{i:06d}.parquet", "rows": 8192, "images": 4096, "bytes": 13 << 30,
            "failed_rows_by_reason": {"decode:not_image": i % 3} if i % 5 == 0 else {},
            "column_bytes": {c: 1 << 20 for c in ("id", "variant", "seed", "crop_box", "image_size", "hr_latent",
                                                    "lr_latent", "sem_tokens", "degrade_params")}}


def _previous_progress(stats: list[dict]) -> float:
    """The line's sum as precompute computed it before ShardTotals: over every written shard per finished shard."""
    t0 = time.perf_counter()
    written = []
    for s in stats:
        written.append(s)
        rows = sum(w["rows"] + sum(w["failed_rows_by_reason"].values()) for w in written)
        _ = f"{len(written)} shards, {rows} rows"
    return time.perf_counter() - t0


def bench_progress(sizes: list[int], previous_max: int = 20000) -> dict:
    from pipelines.features.job import ShardTotals

    out = {}
    for n in sizes:
        stats = [_stats(i) for i in range(n)]
        totals = ShardTotals(n, n * 8192)
        t0 = time.perf_counter()
        for s in stats:
            totals.add(s)
            totals.line(time.perf_counter() - t0 + 1.0)
        now = time.perf_counter() - t0
        before = _previous_progress(stats) if n <= previous_max else None
        out[n] = {"seconds": now, "us_per_shard": now / n * 1e6, "previous_seconds": before}
        print(f"[progress] {n} shards: {now:.3f} s ({now / n * 1e6:.2f} us per shard)" +
              (f"; the previous sum: {before:.2f} s ({before / n * 1e6:.1f} us per shard)" if before is not None
               else f"; the previous sum not run above {previous_max} shards (quadratic: extrapolated below)"),
              flush=True)
    small = [n for n in sizes if out[n]["previous_seconds"] is not None]
    if small:
        b = max(small)
        for n in sizes:
            if out[n]["previous_seconds"] is None:
                out[n]["previous_extrapolated_s"] = out[b]["previous_seconds"] * (n / b) ** 2
                print(f"[progress] {n} shards: the previous sum, extrapolated as n^2 from {b}: "
                      f"{out[n]['previous_extrapolated_s']:.0f} s", flush=True)
    lo, hi = min(sizes), max(sizes)
    expo = math.log(out[hi]["seconds"] / out[lo]["seconds"]) / math.log(hi / lo)
    print(f"[progress] growth exponent of the loop's time {lo} -> {hi} shards: {expo:.2f} (1 = linear)", flush=True)
    return {"sizes": out, "exponent": expo}


# --- training read -------------------------------------------------------------------------------------------------

READ_PROBE = r"""
import inspect, json, sys, numpy as np
sys.path.insert(0, sys.argv[1])
import pyarrow.parquet  # noqa: F401  (imported before the baseline, as a Ray worker has it)
from training import data as td
uris, target, which = json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def rss():
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmRSS:")) * 1024
def hwm():
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) * 1024
kw = {"block_bytes": target} if "block_bytes" in inspect.signature(td.mixed_shards_datasource).parameters else {}
src = td.mixed_shards_datasource(uris, "", 0, **kw)
tasks = src.get_read_tasks(1)
task = tasks[0 if which == "first" else -1]
base = rss()
open("/proc/self/clear_refs", "w").write("5")
rows = blocks = 0
for b in task():
    rows += b.num_rows
    blocks += 1
    del b  # Ray stores each block in the object store and drops it here
print("RESULT " + json.dumps({"tasks": len(tasks), "rows": rows, "blocks": blocks, "peak": hwm() - base,
                              "bound": getattr(src, "memory", None), "row_bytes": getattr(src, "row_bytes", None)}))
"""


def _read_peak(code: str, uris: list[str], target: int) -> dict:
    """The read task's peak: the first and the last task of the epoch, each in a fresh process (a process that
    ran one task keeps its allocator's pages, which would hide the next task's growth)."""
    runs = [_probe(code, READ_PROBE, json.dumps(uris), str(target), which) for which in ("first", "last")]
    best = max(runs, key=lambda r: r["peak"])
    return {**best, "block_rows": max(r["rows"] for r in runs)}


def make_feature_shards(folder: Path, rows: int, group_rows: int, sem_tokens: int, shard_rows: int = 512,
                        seed: int = 0) -> list[str]:
    """Feature shards of random bf16 bits in the real feature schema (vosr-0.5b / 512 px shapes by default)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.features import schema as fsch

    schema = fsch.feature_schema((4, 64, 64), (sem_tokens, 768), "bfloat16")
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, rows, shard_rows)):
        path = folder / f"part-{s:05d}.parquet"
        n_shard = min(shard_rows, rows - start)
        with pq.ParquetWriter(path, schema, compression="zstd") as w:
            for g in range(0, n_shard, group_rows):
                n = min(group_rows, n_shard - g)
                ids = [f"s{s}i{(g + r) // 2}" for r in range(n)]

                def tensor(field: str, n=n):
                    width = schema.field(field).type.list_size
                    vals = rng.integers(0, 2**16, n * width, dtype=np.uint16)
                    return pa.FixedSizeListArray.from_arrays(pa.array(vals), type=schema.field(field).type)
                t = pa.table({"id": ids, "variant": pa.array([(g + r) % 2 for r in range(n)], pa.int32()),
                              "seed": pa.array(range(n), pa.int64()),
                              "crop_box": pa.array([[0, 0, 512, 512]] * n, pa.list_(pa.int32(), 4)),
                              "image_size": pa.array([[512, 512]] * n, pa.list_(pa.int32(), 2)),
                              "hr_latent": tensor("hr_latent"), "lr_latent": tensor("lr_latent"),
                              "sem_tokens": tensor("sem_tokens"), "degrade_params": ["{}"] * n}, schema=schema)
                w.write_table(t, row_group_size=group_rows)
                del t
        paths.append(str(path))
    return paths


def _probe(code_root: str, script: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=code_root, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", script, code_root, *args], capture_output=True, text=True, env=env,
                          cwd=code_root)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"probe failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def bench_training_read(sizes: list[int], targets_mib: list[int], target_mib: int, group_rows: int,
                        sem_tokens: int, compare_root: str = "") -> dict:
    from training.data import read_task_peak_bound

    roots = {"this": str(ROOT)}
    if compare_root:
        roots["compare"] = str(Path(compare_root).resolve())
    out: dict = {"by_size": {k: {} for k in roots}, "by_target": {}}
    with tempfile.TemporaryDirectory(prefix="bench-mem-read-") as tmp:
        for n in sorted(sizes):
            folder = Path(tmp) / "shards"
            subprocess.run(["rm", "-rf", str(folder)], check=False)
            uris = make_feature_shards(folder, n, group_rows, sem_tokens)
            for label, code in roots.items():
                r = _read_peak(code, uris, target_mib * MiB)
                out["by_size"][label][n] = r
                print(f"[training-read:{label}] {n} rows ({r['tasks']} read tasks, {r['block_rows']} rows in the "
                      f"larger task, {r['blocks']} output blocks), group {group_rows} rows of "
                      f"{(r['row_bytes'] or 0) / MiB:.2f} MiB, target {target_mib} MiB: task peak "
                      f"{r['peak'] / MiB:.0f} MiB = {r['peak'] / (target_mib * MiB):.2f}x the target" +
                      (f"; stated bound {r['bound'] / MiB:.0f} MiB" if r.get("bound") else ""), flush=True)
            if n == max(sizes):
                for t in targets_mib:
                    r = _read_peak(str(ROOT), uris, t * MiB)
                    out["by_target"][t] = r
                    print(f"[training-read] target {t} MiB over {n} rows: task peak {r['peak'] / MiB:.0f} MiB = "
                          f"{r['peak'] / (t * MiB):.2f}x the target (stated bound {read_task_peak_bound(t * MiB) / MiB:.0f}"
                          f" MiB; target < 2x: {'met' if r['peak'] < 2 * t * MiB else 'NOT met'})", flush=True)
    for label, runs in out["by_size"].items():
        xs = sorted(runs)
        s = slope([float(x) for x in xs], [float(runs[x]["peak"]) for x in xs])
        out[f"{label}_slope_bytes_per_row"] = s
        tail = (runs[xs[-1]]["peak"] - runs[xs[-2]]["peak"]) / (xs[-1] - xs[-2]) if len(xs) > 1 else float("nan")
        print(f"[training-read:{label}] read-task peak slope over the corpus {xs[0]} -> {xs[-1]} rows: "
              f"{s:.0f} bytes per row (least squares; a corpus smaller than one block makes a smaller block); "
              f"{xs[-2]} -> {xs[-1]}: {tail:.0f} bytes per row", flush=True)
    return out


# --- training plan (driver) ---------------------------------------------------------------------------------------

PLAN_PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from training import data as td
units_n, per_file, row_bytes, group_rows = (int(x) for x in sys.argv[2:6])
def rss():
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmRSS:")) * 1024
files = -(-units_n // per_file)
uris = [f"/nonexistent/features/shards/part-{i:06d}.parquet" for i in range(files)]
units = [(i, g, group_rows) for i in range(files) for g in range(per_file)][:units_n]
warm = units[:64]
td._row_group_units = lambda paths, fs: (warm, row_bytes, len(warm) * group_rows * row_bytes)
td.mixed_shards_datasource(uris, "", 0, block_bytes=512 << 20).get_read_tasks(1)  # imports, as the driver has them
td._row_group_units = lambda paths, fs: (units, row_bytes, len(units) * group_rows * row_bytes)
base = rss()
src = td.mixed_shards_datasource(uris, "", 0, block_bytes=512 << 20)
tasks = src.get_read_tasks(1)
after = rss()
print("RESULT " + json.dumps({"units": units_n, "tasks": len(tasks), "bytes": after - base}))
"""


def bench_training_plan(sizes: list[int], group_rows: int, row_bytes: int) -> dict:
    """Driver memory of one epoch's read plan (footers' units, the epoch's order, one ReadTask per block) at
    each number of row groups; the footers are stubbed so no files are needed."""
    out = {}
    for n in sorted(sizes):
        r = _probe(str(ROOT), PLAN_PROBE, str(n), "8", str(row_bytes), str(group_rows))
        out[n] = r
        print(f"[training-plan] {n:,} row groups of {group_rows} rows ({r['tasks']:,} read tasks): driver +"
              f"{r['bytes'] / MiB:.0f} MiB = {r['bytes'] / n:.0f} B per row group", flush=True)
    xs = sorted(out)
    s = slope([float(x) for x in xs], [float(out[x]["bytes"]) for x in xs])
    print(f"[training-plan] driver slope: {s:.0f} bytes per row group = {s / group_rows:.1f} bytes per feature row",
          flush=True)
    return {"by_size": out, "bytes_per_unit": s}


# --- merge ---------------------------------------------------------------------------------------------------------

MERGE_PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from pipelines.features import writer as fw
settings = json.loads(sys.argv[2]); parts = json.loads(sys.argv[3]); rows = int(sys.argv[4])
import pyarrow.parquet as pq
settings["schema"] = pq.read_schema(parts[0]).remove(pq.read_schema(parts[0]).get_field_index("error"))
settings["compression"] = "zstd"; settings["dictionary"] = ["id", "degrade_params"]
def rss():
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmRSS:")) * 1024
def hwm():
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) * 1024
base = rss()
open("/proc/self/clear_refs", "w").write("5")
stats = fw.merge_parts(settings, "part-00000.parquet", parts)
peak = hwm() - base
row_bytes = fw.schema_row_bytes(settings["schema"])
print("RESULT " + json.dumps({"peak": peak, "rows": stats["rows"], "bytes": stats["bytes"],
                              "bound": fw.merge_peak_bound(settings["row_group_size"], row_bytes, rows),
                              "task_bound": getattr(fw, "merge_task_peak_bytes", fw.merge_peak_bound)(
                                  settings["row_group_size"], row_bytes, rows)}))
"""


def bench_merge(sizes: list[int], group_rows: int, sem_tokens: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.features import writer as fw

    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-mem-merge-") as tmp:
        for n in sorted(sizes):
            src = Path(tmp) / f"src-{n}"
            uris = make_feature_shards(src, n, group_rows, sem_tokens, shard_rows=n)
            parts_dir = Path(tmp) / f"features-{n}" / fw.PARTS_DIR / "part-00000"
            parts_dir.mkdir(parents=True)
            parts = []
            f = pq.ParquetFile(uris[0])
            step = max(1, group_rows // fw.PART_GROUP_DIVISOR)
            for i, batch in enumerate(f.iter_batches(batch_size=max(64, group_rows))):  # encoder batches -> parts
                t = pa.Table.from_batches([batch]).append_column("error", pa.array([""] * batch.num_rows))
                p = parts_dir / f"{i:05d}.parquet"
                pq.write_table(t, p, compression=None, row_group_size=step)
                parts.append(str(p))
            subprocess.run(["rm", "-rf", str(src)], check=False)
            settings = {"output": str(Path(tmp) / f"features-{n}"), "endpoint_url": "", "row_group_size": group_rows}
            r = _probe(str(ROOT), MERGE_PROBE, json.dumps(settings), json.dumps(parts), str(n))
            out[n] = r
            print(f"[merge] shard of {n} rows ({r['bytes'] / MiB:.0f} MiB written), row groups of {group_rows}: "
                  f"task peak RSS {r['peak'] / MiB:.0f} MiB; stated: merge_peak_bound (Arrow) {r['bound'] / MiB:.0f} "
                  f"MiB, merge_task_peak_bytes (RSS, reserved) {r['task_bound'] / MiB:.0f} MiB "
                  f"({'under' if r['peak'] <= r['task_bound'] else 'OVER'})", flush=True)
            subprocess.run(["rm", "-rf", str(Path(tmp) / f"features-{n}")], check=False)
    xs = sorted(out)
    s = slope([float(x) for x in xs], [float(out[x]["peak"]) for x in xs])
    print(f"[merge] merge-task peak slope {xs[0]} -> {xs[-1]} shard rows: {s:.0f} bytes per row", flush=True)
    return {"by_size": out, "slope_bytes_per_row": s}


# --- precompute driver ---------------------------------------------------------------------------------------------

def bench_driver(sizes: list[int], per_shard: int) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_scale_precompute import bench_precompute_scale

    res = bench_precompute_scale(tuple(sorted(sizes)), per_shard=per_shard,
                                 log=lambda s: print(f"[precompute-driver] {s}", flush=True))
    runs = res["runs"]["this"]
    s = slope([float(r["size"]) for r in runs], [r["peak_rss_mib"] * MiB for r in runs])
    print(f"[precompute-driver] driver peak RSS slope {runs[0]['size']} -> {runs[-1]['size']} images: "
          f"{s:.0f} bytes per image", flush=True)
    res["slope_bytes_per_image"] = s
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sections = ["progress", "training-read", "training-plan", "merge", "precompute-driver"]
    ap.add_argument("--only", nargs="+", default=sections, choices=sections)
    ap.add_argument("--progress-shards", type=int, nargs="+", default=[6000, 20000, 60000])
    ap.add_argument("--read-rows", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--read-targets-mib", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--read-target-mib", type=int, default=512)
    ap.add_argument("--group-rows", type=int, default=64)
    ap.add_argument("--sem-tokens", type=int, default=1024)
    ap.add_argument("--compare-root", default="")
    ap.add_argument("--plan-units", type=int, nargs="+", default=[100_000, 400_000, 800_000])
    ap.add_argument("--merge-rows", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--merge-group-rows", type=int, default=64)
    ap.add_argument("--merge-sem-tokens", type=int, default=64)
    ap.add_argument("--driver-sizes", type=int, nargs="+", default=[500, 2000, 4000])
    ap.add_argument("--driver-per-shard", type=int, default=100)
    ap.add_argument("--json", default="", help="also write the results to this file")
    args = ap.parse_args(argv)
    res = {}
    if "progress" in args.only:
        res["progress"] = bench_progress(sorted(args.progress_shards))
    if "training-read" in args.only:
        res["training_read"] = bench_training_read(args.read_rows, args.read_targets_mib, args.read_target_mib,
                                                   args.group_rows, args.sem_tokens, args.compare_root)
    if "training-plan" in args.only:
        res["training_plan"] = bench_training_plan(args.plan_units, args.group_rows, 1_638_680)
    if "merge" in args.only:
        res["merge"] = bench_merge(args.merge_rows, args.merge_group_rows, args.merge_sem_tokens)
    if "precompute-driver" in args.only:
        res["precompute_driver"] = bench_driver(args.driver_sizes, args.driver_per_shard)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
