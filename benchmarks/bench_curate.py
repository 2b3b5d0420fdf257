"""Curation stage-1 throughput (fetch from disk -> safe decode -> filters -> hashes -> ledger shard):
a plain one-process loop vs the curate job's stage 1 (one Ray task per block) on 1 CPU vs on 2 CPUs, same blocks,
same per-image work.

    .venv/bin/python benchmarks/bench_curate.py [--images 2000] [--rows-per-block 50]

About 2,000 images are generated once from the dev photos (random crops and resizes, JPEG q=90) into a cache
folder. Each configuration writes to a fresh output. Ray start-up is excluded (it is paid once per job, not per
image); a warm-up run on each instance starts the workers and imports the stack first. Prints images/s and the
ratios to the loop (targets: Ray 2 CPUs >= 1.7x, Ray 1 CPU >= 0.85x). The loop is timed before and after the
Ray runs and averaged, because a shared machine's load drifts. CPU only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# One math thread per process, as Ray gives each 1-CPU worker (OMP_NUM_THREADS=1); otherwise the loop's BLAS /
# FFT thread pools fight over the cores and the comparison measures oversubscription, not the pipeline.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobkit.config import config_from_dict  # noqa: E402
from pipelines import curate  # noqa: E402
from pipelines.curation.sources import plan_units  # noqa: E402
from pipelines.curation.stage1 import run_unit  # noqa: E402


def source_photos() -> list[Path]:
    for root in (ROOT.parent / "shared" / "data" / "dev", ROOT / "assets" / "photos"):
        if root.is_dir():
            found = sorted(p for p in root.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
            if found:
                return found
    raise SystemExit("no photos found")


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    marker = folder / f".done-{n}"
    if marker.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in source_photos()]
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        fw, fh = rng.uniform(0.5, 1.0, 2)
        cw, ch = max(64, int(w * fw)), max(64, int(h * fh))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x, y, x + cw, y + ch))
        s = rng.uniform(0.6, 1.0)
        crop = crop.resize((max(32, int(cw * s)), max(32, int(ch * s))), Image.Resampling.BILINEAR)
        crop.save(folder / f"img{i:05d}.jpg", quality=90)
    marker.write_text("ok")


def config(src: Path, out: Path, rows: int):
    return config_from_dict({"run": {"mlflow": {"enabled": False}, "output_root": str(out / "root")},
                             "curate": {"sources": [str(src)], "output": str(out), "rows_per_shard": rows,
                                        "filters": {"min_short_side": 128, "min_gradient": 1.0,
                                                    "min_entropy": 3.0}}})


def run_loop(src: Path, out: Path, rows: int) -> float:
    cfg = config(src, out, rows)
    units = plan_units(cfg.curate.sources, rows)
    keys = [u.key(curate.stage1_salt(cfg.curate)) for u in units]
    t0 = time.perf_counter()
    for u, k in zip(units, keys):
        run_unit(u, k, cfg.curate)
    return time.perf_counter() - t0


def run_ray(src: Path, out: Path, rows: int, cpus: int, warm: Path) -> float:
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=300 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        # warm-up: start the workers and import the stack on a tiny input
        wcfg = config(warm, out.with_name(out.name + "-warm"), 4)
        units = plan_units(wcfg.curate.sources, 4)
        curate.stage_fetch_analyse(units, [u.key("warm") for u in units], wcfg.curate)
        cfg = config(src, out, rows)
        units = plan_units(cfg.curate.sources, rows)
        keys = [u.key(curate.stage1_salt(cfg.curate)) for u in units]
        t0 = time.perf_counter()
        res = curate.stage_fetch_analyse(units, keys, cfg.curate)
        took = time.perf_counter() - t0
        assert res["blocks_run"] == len(units)
        return took
    finally:
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rows-per-block", type=int, default=50)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vosr-bench-curate"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    src = Path(args.cache) / "images"
    make_images(src, args.images)
    warm = Path(args.cache) / "warm"
    make_images(warm, 8, seed=1)
    work = Path(tempfile.mkdtemp(prefix="bench-curate-"))
    try:
        n = args.images
        run_loop(warm, work / "loop-warm", 4)  # imports and first-call costs, as the Ray runs get
        t_loop_a = run_loop(src, work / "loop", args.rows_per_block)
        print(f"[bench] loop done: {t_loop_a:.2f} s", flush=True)
        t_r1 = run_ray(src, work / "ray1", args.rows_per_block, 1, warm)
        print(f"[bench] ray 1 CPU done: {t_r1:.2f} s", flush=True)
        t_r2 = run_ray(src, work / "ray2", args.rows_per_block, 2, warm)
        print(f"[bench] ray 2 CPUs done: {t_r2:.2f} s", flush=True)
        # the machine is shared: time the loop again after the Ray runs and use the mean of both
        t_loop_b = run_loop(src, work / "loop-again", args.rows_per_block)
        t_loop = (t_loop_a + t_loop_b) / 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"images={n} rows_per_block={args.rows_per_block} cpus_on_machine={os.cpu_count()} "
          f"load_avg={os.getloadavg()[0]:.1f}")
    print(f"loop       : {t_loop:7.2f} s  {n / t_loop:7.1f} img/s  (before Ray {t_loop_a:.2f} s, after {t_loop_b:.2f} s)")
    print(f"ray 1 CPU  : {t_r1:7.2f} s  {n / t_r1:7.1f} img/s  ratio {t_loop / t_r1:.2f}x (target >= 0.85x)")
    print(f"ray 2 CPUs : {t_r2:7.2f} s  {n / t_r2:7.1f} img/s  ratio {t_loop / t_r2:.2f}x (target >= 1.7x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
