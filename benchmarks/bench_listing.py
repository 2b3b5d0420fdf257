"""The curate driver's memory for planning a folder of image files, at growing file counts: listed by Ray tasks
into manifests (now) against every path listed and held on the driver (the former planner: a sorted list of all
paths, and each unit's copy of its run of paths).

    .venv/bin/python benchmarks/bench_listing.py [--files 25000,100000,400000] [--rows-per-unit 4096]

Empty .jpg files in 16 subdirectories are made once into a cache folder (listing reads names, not bytes). For each
count, in one driver process with a local 2-CPU Ray: the planner's driver-side Python peak (tracemalloc) and RSS
peak growth (VmHWM reset before each step, proc(5)), for `plan_units` with the curate job's Ray runner, then for the
former planner's data. Prints both per count and their growth in bytes per file between the smallest and largest
count, with listing.listing_peak_bytes (the stated driver bound) for the largest. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.curation import listing  # noqa: E402
from pipelines.curation.sources import plan_units  # noqa: E402
from vosr import storage  # noqa: E402

SUBDIRS = 16


def make_files(folder: Path, n: int) -> None:
    marker = folder / ".done"
    if marker.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    for d in range(SUBDIRS):
        (folder / f"part{d:02d}").mkdir(parents=True)
    for i in range(n):
        (folder / f"part{i % SUBDIRS:02d}" / f"{i:09d}.jpg").touch()
    marker.write_text("ok")


def _hwm_reset() -> int:
    open("/proc/self/clear_refs", "w").write("5")
    return _status("VmRSS")


def _status(key: str) -> int:
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key + ":")) * 1024


def measure(fn) -> tuple[int, int, float, object]:
    """(Python peak bytes, RSS peak growth bytes, seconds, result) of fn() in this process."""
    base = _hwm_reset()
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    took = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, _status("VmHWM") - base, took, out


def former_planner(src: str, rows: int):
    """What the driver held before: every path, sorted, and each unit's copy of its paths."""
    files = storage.list_files(src)
    images = [f for f in files if f.lower().endswith(".jpg")]
    return [images[i:i + rows] for i in range(0, len(images), rows)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", default="25000,100000,400000")
    ap.add_argument("--rows-per-unit", type=int, default=4096)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vosr-bench-listing"))
    args = ap.parse_args()
    counts = [int(x) for x in args.files.split(",")]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from jobkit.ray_env import start_local_ray
    from pipelines.curate import ray_runner

    start_local_ray({"PYTHONPATH": str(ROOT)}, num_cpus=2, object_store_memory=300 * 2**20)
    work = Path(tempfile.mkdtemp(prefix="bench-listing-"))
    rows = {}
    try:
        warm = Path(args.cache) / "warm"
        make_files(warm, 64)
        plan_units([str(warm)], args.rows_per_unit, workdir=str(work / "warm"), runner=ray_runner)
        for n in counts:
            src = Path(args.cache) / f"files-{n}"
            make_files(src, n)
            py_new, rss_new, t_new, units = measure(lambda src=src: plan_units(
                [str(src)], args.rows_per_unit, workdir=str(work / "listing"), runner=ray_runner))
            py_old, rss_old, t_old, old = measure(lambda src=src: former_planner(str(src), args.rows_per_unit))
            assert sum(u.end - u.start for u in units) == n == sum(len(x) for x in old)
            rows[n] = (py_new, rss_new, py_old, rss_old, len(units))
            print(f"{n:>9} files, {len(units):>5} units: tasks + manifests: python peak {py_new / 2**20:7.2f} MiB, "
                  f"RSS growth {rss_new / 2**20:7.1f} MiB, {t_new:5.1f} s | former (paths on the driver): python "
                  f"peak {py_old / 2**20:7.1f} MiB, RSS growth {rss_old / 2**20:7.1f} MiB, {t_old:5.1f} s",
                  flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    lo, hi = min(counts), max(counts)
    span = hi - lo
    new_slope = (rows[hi][0] - rows[lo][0]) / span
    old_slope = (rows[hi][2] - rows[lo][2]) / span
    print(f"driver python-peak growth per file, {lo} -> {hi} files: {new_slope:.2f} B (tasks + manifests) vs "
          f"{old_slope:.1f} B (former); RSS: {(rows[hi][1] - rows[lo][1]) / span:.2f} B vs "
          f"{(rows[hi][3] - rows[lo][3]) / span:.1f} B")
    print(f"stated driver bound at {hi} files (listing_peak_bytes): "
          f"{listing.listing_peak_bytes(rows[hi][4], rows[hi][4], SUBDIRS) / 2**20:.2f} MiB; at 100M files and "
          f"4,096 rows per unit: {listing.listing_peak_bytes(24_415, 1_526, 1_000) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
