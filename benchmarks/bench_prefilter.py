"""Filter before fetching: how many fetches a LAION-style list's declared sizes avoid, and stage 1's time with and
without that pre-filter (curate.prefilter), at the shipped filter settings (FilterConfig defaults:
min_short_side 512, max_aspect_ratio 3.0, as configs/curate/urls.yaml and configs/cluster/curate.yaml).

    .venv/bin/python benchmarks/bench_prefilter.py [--rows 2000] [--rows-per-block 100] [--latency-ms 50]
                                                   [--per-domain-rps 50] [--repeats 1]

The list: a synthetic LAION-like Parquet (URL, TEXT, WIDTH, HEIGHT, LICENSE) whose sizes follow a stated model:
the short side is log-normal (median 360 px, sigma 0.55, clipped to 32..4096) and the long/short ratio is
exp(|N(0, 0.45)|), landscape or portrait at random. The model is anchored to one published figure: LAION-5B has
170M images of at least 1024x1024 (the laion-high-resolution subset's card), 2.9% of its 5.85B; the model gives
about 2.5%. The script prints the model's shares at 256/512/1024 px so it can be compared with other lists.
Each row's URL serves a JPEG of exactly its declared size (a crop of a dev photo, generated once into a cache), so
the decoded re-check agrees with the list. A loopback server (tests/helpers/http_fixture.py) counts requests and
answers after --latency-ms (a stand-in for the network; 0 = loopback speed). Every URL is on the one loopback
domain, so crawl.per_domain_rps (--per-domain-rps, crawl-wide) is that domain's request budget, as politeness is
for a real crawl's busy domains (docs/scale.md s2); set it high (e.g. 100000) for a CPU-bound comparison, where
stage 1's time is mostly the decoding and analysis of the large images that both runs fetch.

Stage 1 of the curate job (Ray tasks, a local Ray with 2 CPUs; start-up and a warm-up excluded) runs on the same
list with the pre-filter and without, into fresh outputs, in the order without, with, with, without (--repeats
times), so drifting load weighs on both alike. Prints the share of rows decided from the list, the server's
request counts and bytes served, the mean stage-1 seconds of each and their ratio. CPU only; the machine's load
is printed (timings on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from jobkit.config import config_from_dict  # noqa: E402
from pipelines import curate  # noqa: E402
from pipelines.curation.sources import plan_units  # noqa: E402

MEDIAN_SHORT, SIGMA_SHORT, SIGMA_ASPECT = 360.0, 0.55, 0.45


def sizes(n: int, seed: int) -> np.ndarray:
    """(n, 2) declared width, height under the stated model."""
    rng = np.random.default_rng(seed)
    short = np.clip(np.exp(rng.normal(np.log(MEDIAN_SHORT), SIGMA_SHORT, n)), 32, 4096)
    long = np.clip(short * np.exp(np.abs(rng.normal(0.0, SIGMA_ASPECT, n))), 32, 8192)
    portrait = rng.random(n) < 0.5
    w = np.where(portrait, short, long).round().astype(int)
    h = np.where(portrait, long, short).round().astype(int)
    return np.stack([w, h], axis=1)


def model_shares(seed: int = 1, n: int = 1_000_000) -> dict:
    wh = sizes(n, seed)
    short = wh.min(axis=1)
    return {f">= {s} px": float((short >= s).mean()) for s in (256, 512, 1024)} | {
        "aspect > 3": float((wh.max(axis=1) / wh.min(axis=1) > 3).mean())}


def source_photos() -> list[Path]:
    for root in (ROOT.parent / "shared" / "data" / "dev", ROOT / "assets" / "photos"):
        found = sorted(p for p in root.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if found:
            return found
    raise SystemExit("no photos found")


def make_images(folder: Path, wh: np.ndarray, seed: int) -> list[Path]:
    """One JPEG per row at its declared size (cached)."""
    marker = folder / f".done-{len(wh)}-{seed}"
    files = [folder / f"r{i:06d}.jpg" for i in range(len(wh))]
    if marker.exists():
        return files
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    photos = [Image.open(p).convert("RGB") for p in source_photos()]
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(wh):
        img = photos[i % len(photos)]
        cw, ch = img.size
        x, y = int(rng.integers(0, cw // 4 + 1)), int(rng.integers(0, ch // 4 + 1))
        crop = img.crop((x, y, x + cw * 3 // 4, y + ch * 3 // 4))
        crop.resize((int(w), int(h)), Image.Resampling.BILINEAR).save(files[i], quality=90)
    marker.write_text("ok")
    return files


def config(src: Path, out: Path, rows: int, prefilter: bool, port_host: str, rps: float):
    return config_from_dict({"run": {"mlflow": {"enabled": False}, "output_root": str(out / "root")},
                             "curate": {"sources": [str(src)], "output": str(out), "rows_per_shard": rows,
                                        "prefilter": prefilter, "cpus_per_block": 0.5,
                                        "crawl": {"allow_hosts": [port_host], "per_domain_rps": rps,
                                                  "per_domain_concurrency": 64, "concurrency": 32,
                                                  "timeout_s": 60.0}}})


def stage1(cfg) -> tuple[float, dict]:
    units = plan_units(cfg.curate.sources, cfg.curate.rows_per_shard)
    keys = [u.key(curate.stage1_salt(cfg.curate)) for u in units]
    t0 = time.perf_counter()
    res = curate.stage_fetch_analyse(units, keys, cfg.curate)
    return time.perf_counter() - t0, res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--rows-per-block", type=int, default=100)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--per-domain-rps", type=float, default=50.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vosr-bench-prefilter"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from jobkit.ray_env import start_local_ray
    from pipelines.curation.stage1 import reason_counts
    from tests.helpers.http_fixture import http_server

    wh = sizes(args.rows, args.seed)
    files = make_images(Path(args.cache) / f"images-{args.seed}", wh, args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-prefilter-"))
    import ray

    start_local_ray({"PYTHONPATH": str(ROOT)}, num_cpus=2, object_store_memory=300 * 2**20)
    try:
        with http_server(files, hang_s=1.0, latency_s=args.latency_ms / 1000) as site:
            listing = work / "laion.parquet"
            pq.write_table(pa.table({
                "URL": [site.photo_url(f.name) for f in files],
                "TEXT": [f"a photo, row {i}" for i in range(len(files))],
                "WIDTH": pa.array(wh[:, 0], pa.int32()), "HEIGHT": pa.array(wh[:, 1], pa.int32()),
                "LICENSE": ["?"] * len(files)}), listing)
            host = site.base_url.split("//", 1)[1]
            warm = work / "warm.parquet"
            pq.write_table(pa.table({"URL": [site.photo_url(f.name) for f in files[:4]]}), warm)
            stage1(config(warm, work / "warm", 2, True, host, args.per_domain_rps))   # workers up, imports
            size = {site.photo_url(f.name): f.stat().st_size for f in files}
            results: dict = {True: [], False: []}
            for rep, prefilter in enumerate([False, True, True, False] * args.repeats):
                out = work / f"out-{rep}"
                n0 = len(site.requests)
                took, _ = stage1(config(listing, out, args.rows_per_block, prefilter, host, args.per_domain_rps))
                paths = [p for _, p, _ in site.requests[n0:]]
                served = sum(size.get(site.url(p), 0) for p in paths)
                ledger = pa.concat_tables(pq.read_table(p) for p in (out / "_stage1").glob("*.parquet"))
                results[prefilter].append((took, len(paths), served, reason_counts(ledger["reason"].to_pylist())))
                print(f"[bench] prefilter={prefilter}: {took:.2f} s, {len(paths)} requests", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    on, off = results[True], results[False]
    t_on, t_off = (sum(r[0] for r in x) / len(x) for x in (on, off))
    _, hits_on, bytes_on, c_on = on[0]
    _, hits_off, bytes_off, c_off = off[0]
    decided = sum(n for r, n in c_on["filtered"].items() if r.startswith("prefilter_"))
    print(f"rows={args.rows} rows_per_block={args.rows_per_block} latency_ms={args.latency_ms} "
          f"per_domain_rps={args.per_domain_rps} runs={len(on)}+{len(off)} load_avg={os.getloadavg()[0]:.1f} "
          f"cpus_on_machine={os.cpu_count()}")
    print("size model shares (1M draws): " + ", ".join(f"{k} {v:.1%}" for k, v in model_shares().items()))
    print(f"decided from the list  : {decided} of {args.rows} rows = {decided / args.rows:.1%} of fetches avoided "
          f"({dict((r, n) for r, n in c_on['filtered'].items() if r.startswith('prefilter_'))})")
    print(f"requests               : {hits_on} with the pre-filter, {hits_off} without")
    print(f"bytes served           : {bytes_on / 2**20:.1f} MiB with, {bytes_off / 2**20:.1f} MiB without "
          f"({1 - bytes_on / max(1, bytes_off):.1%} avoided: the rows decided are the small images)")
    print(f"kept by stage 1 (ok)   : {c_on['ok']} with, {c_off['ok']} without (must be equal)")
    print(f"stage-1 time (mean)    : {t_on:.2f} s with, {t_off:.2f} s without: {t_off / t_on:.2f}x "
          f"(runs with: {', '.join(f'{r[0]:.1f}' for r in on)}; without: {', '.join(f'{r[0]:.1f}' for r in off)})")
    return 0 if c_on["ok"] == c_off["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
