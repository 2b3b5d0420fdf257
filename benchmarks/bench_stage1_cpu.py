"""Stage-1 CPU-seconds per image (for docs/scale.md): the curate job's per-block work (read -> safe decode ->
filters -> hashes -> ledger shard, pipelines/curation/stage1.run_unit) in one process with one math thread, on
the bench_curate.py images, timed with the process CPU clock (not wall time: the machine is shared).

    .venv/bin/python benchmarks/bench_stage1_cpu.py [--images 1000] [--rows-per-block 50]

Prints CPU-s per image and per megapixel (the decode and filter cost grows with the pixels), and the images' mean
size, so the number can be scaled to a crawl's image sizes. Fetching over the network is not included (bodies are
read from local files); see docs/scale.md for how that is accounted.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_curate import make_images, run_loop  # noqa: E402
from PIL import Image  # noqa: E402


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rows-per-block", type=int, default=50)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vosr-bench-curate"))
    args = ap.parse_args(argv)
    src = Path(args.cache) / f"images-{args.images}"
    make_images(src, args.images)
    warm = Path(args.cache) / "warm"
    make_images(warm, 8, seed=1)
    files = sorted(src.glob("*.jpg"))
    pixels = sum(Image.open(f).size[0] * Image.open(f).size[1] for f in files)
    nbytes = sum(f.stat().st_size for f in files)
    with tempfile.TemporaryDirectory(prefix="bench-s1cpu-") as work:
        run_loop(warm, Path(work) / "warm", 4)  # imports and first-call costs
        c0, t0 = cpu_seconds(), time.perf_counter()
        run_loop(src, Path(work) / "run", args.rows_per_block)
        cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
    n = len(files)
    print(f"images={n} mean_pixels={pixels / n / 1e6:.3f} MP mean_bytes={nbytes / n / 1024:.1f} KiB "
          f"load_avg={os.getloadavg()[0]:.1f}")
    print(f"cpu_s={cpu:.2f} wall_s={wall:.2f} cpu_s_per_image={cpu / n * 1e3:.2f} ms "
          f"cpu_s_per_megapixel={cpu / (pixels / 1e6) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
