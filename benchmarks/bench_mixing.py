"""Batch mixing of the training loader (docs/mixing.md): 16 feature-like shards, one source each, written sorted by
(id, variant) with row groups of 64 rows, as precompute writes them; read into batches of 16 the old way (shards in
file order, Ray's 64-row local shuffle buffer) and the mixed way (training/data.py: seeded per-epoch row-group
order across shards, blocks spread by variant, then epoch_batches / spread_batches with a 2000-sample buffer that
keeps an image's variants out of one batch), at several data sizes.

    .venv/bin/python benchmarks/bench_mixing.py [--shards 16] [--images 64 256] [--variants 4] [--row-kb 8]

The default sizes are 4,096 rows (2x the buffer) and 16,384 rows (8x the buffer: the buffer holds an eighth of
the epoch, so a loader cannot look random just because the whole set fits in its buffer). Ray Data's block size
is scaled to the rows as real feature rows scale it: a vosr-0.5b row is about 1.6 MiB (DINOv2-B tokens, 1024 x 768
in float16, plus two 4x64x64 latents), so Ray's 128 MiB blocks hold about 80 rows; here the bench sets
DataContext.target_max_block_size to 64 rows' bytes, one row group (with the default, 8 KiB rows would make one
block of the whole set, which Ray's buffer would then shuffle in full, unlike training on real features).

Per size it prints, for each loader and for random sampling (batches of 16 cut from a uniform random permutation
of all rows, i.e. sampling without replacement from the whole set; simulated over 20 epochs, with the exact
expectation beside it):
  - distinct sources per batch of 16 (target: mixed within 10% of random);
  - same-image pairs per batch: pairs of rows of one image in a batch, averaged over batches (target: mixed at
    or below random's C(16,2) (K-1)/(N-1));
  - for information only (no target), the same pair count in windows of 8 consecutive batches (128 rows): a
    local buffer of B rows keeps an image's variants within about B rows of each other, while random sampling
    spreads them over the epoch;
  - the loaders' samples/s over --epochs epochs each (target: mixed >= 0.9x unmixed), epochs of the two loaders
    alternated on one local Ray (2 CPUs), start-up excluded; and whether mixed epochs 1 and 2 differ in order.
    CPU only; the stats above are over all the epochs run.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.data import _SplitFilter, epoch_batches, read_mixed_shards  # noqa: E402

BATCH = 16
WINDOW = 8  # batches per window of the information-only pair count
OLD_BUFFER = 64  # the unmixed loader's local buffer (the old train.shuffle_buffer)
ROWS_PER_BLOCK = 64  # rows per Ray Data block, about what 128 MiB blocks of ~1.6 MiB real feature rows hold


def write_shards(folder: Path, shards: int, images: int, variants: int, row_kb: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        ids = [f"src{s:02d}_img{i:05d}" for i in range(images) for _ in range(variants)]
        var = [v for _ in range(images) for v in range(variants)]
        payload = [rng.bytes(row_kb * 1024) for _ in ids]
        table = pa.table({"id": ids, "variant": pa.array(var, pa.int32()), "source": [s] * len(ids),
                          "payload": pa.array(payload, pa.binary())})
        p = folder / f"shard-{s:05d}.parquet"
        pq.write_table(table, p, row_group_size=64, compression="none")
        paths.append(str(p))
    return paths


def pairs_in(ids: list) -> int:
    _, counts = np.unique(np.asarray(ids), return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def batch_stats(batches: list[tuple[list[int], list[str]]]) -> dict[str, float]:
    """Mean distinct sources and same-image pairs per batch, and pairs per window of WINDOW batches."""
    windows = [sum((ids for _, ids in batches[i:i + WINDOW]), [])
               for i in range(0, len(batches) - WINDOW + 1, WINDOW)]
    return {"distinct": float(np.mean([len(set(s)) for s, _ in batches])),
            "pairs": float(np.mean([pairs_in(ids) for _, ids in batches])),
            "window_pairs": float(np.mean([pairs_in(w) for w in windows]))}


def random_batches(sources: np.ndarray, ids: np.ndarray, epochs: int, seed: int = 0):
    """Batches of a fresh uniform permutation of all rows per epoch: sampling without replacement."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        perm = rng.permutation(len(ids))
        out += [(sources[perm[i:i + BATCH]].tolist(), ids[perm[i:i + BATCH]].tolist())
                for i in range(0, len(perm) - BATCH + 1, BATCH)]
    return out


def expected_random(n_rows: int, shards: int, variants: int) -> tuple[float, float]:
    """Exact expectations for a batch of BATCH rows drawn without replacement from n_rows rows, shards equal
    sources, images of `variants` rows: distinct sources (hypergeometric) and same-image pairs."""
    per = n_rows // shards
    p_absent = math.comb(n_rows - per, BATCH) / math.comb(n_rows, BATCH)
    return shards * (1 - p_absent), math.comb(BATCH, 2) * (variants - 1) / (n_rows - 1)


def run_epoch(it, mixed: bool, buffer: int, epoch: int) -> tuple[list, float, int]:
    """One epoch of a split iterator into batches of BATCH: (batches as (sources, ids), seconds, rows)."""
    if mixed:  # the training path: BatchStream's epoch_batches
        stream = epoch_batches(it, BATCH, buffer, seed=0, rank=0, epoch=epoch)
    else:  # the old path: Ray's local shuffle buffer over the shards in file order
        stream = it.iter_batches(batch_size=BATCH, batch_format="pyarrow", drop_last=True,
                                 local_shuffle_buffer_size=OLD_BUFFER, local_shuffle_seed=epoch)
    batches, rows = [], 0
    t0 = time.perf_counter()
    for b in stream:
        batches.append((b.column("source").to_pylist(), b.column("id").to_pylist()))
        rows += b.num_rows
    return batches, time.perf_counter() - t0, rows


def bench_size(folder: Path, args, images: int) -> bool:
    import ray

    paths = write_shards(folder, args.shards, images, args.variants, args.row_kb)
    n_rows = args.shards * images * args.variants
    keep = _SplitFilter(0.0, keep_holdout=False)

    def unmixed():
        return ray.data.read_parquet(paths).map_batches(keep, batch_format="pyarrow")

    def mixed():
        return read_mixed_shards(paths, "", seed=0).map_batches(keep, batch_format="pyarrow")

    iters = {"unmixed": unmixed().streaming_split(1)[0], "mixed": mixed().streaming_split(1)[0]}
    results: dict[str, dict] = {k: {"t": 0.0, "rows": 0, "batches": [], "epochs": []} for k in iters}
    ratios = []
    for epoch in range(args.epochs):  # alternate epochs, so load drift on a shared machine hits both alike
        sps = {}
        for name, it in iters.items():
            batches, dt, rows = run_epoch(it, name == "mixed", args.buffer, epoch)
            r = results[name]
            r["t"] += dt
            r["rows"] += rows
            r["batches"] += batches
            r["epochs"].append([ids for _, ids in batches])
            sps[name] = rows / dt
        ratios.append(sps["mixed"] / sps["unmixed"])
    for p in paths:
        Path(p).unlink()

    all_sources = np.repeat(np.arange(args.shards), images * args.variants)
    all_ids = np.array([f"src{s:02d}_img{i:05d}" for s in range(args.shards) for i in range(images)
                        for _ in range(args.variants)])
    rnd = batch_stats(random_batches(all_sources, all_ids, epochs=20))
    exp_distinct, exp_pairs = expected_random(n_rows, args.shards, args.variants)
    print(f"\n== {args.shards} shards x {images} images x {args.variants} variants = {n_rows} rows "
          f"({n_rows / args.buffer:.1f}x the {args.buffer}-sample buffer), {args.row_kb} KiB/row, batches of "
          f"{BATCH}")
    print(f"{'loader':<8} {'distinct sources/batch':>23} {'same-image pairs/batch':>23} "
          f"{f'pairs/{WINDOW} batches (info)':>24} {'samples/s':>10}")
    print(f"{'random':<8} {rnd['distinct']:>15.2f} (exp {exp_distinct:5.2f}) {rnd['pairs']:>14.4f} "
          f"(exp {exp_pairs:.4f}) {rnd['window_pairs']:>24.2f} {'':>10}")
    for name in ("unmixed", "mixed"):
        r = results[name]
        r["sps"] = r["rows"] / r["t"]
        r["stats"] = st = batch_stats(r["batches"])
        print(f"{name:<8} {st['distinct']:>23.2f} {st['pairs']:>23.4f} {st['window_pairs']:>24.2f} "
              f"{r['sps']:>10.0f}")
    m = results["mixed"]["stats"]
    gap = (exp_distinct - m["distinct"]) / exp_distinct
    ratio = results["mixed"]["sps"] / results["unmixed"]["sps"]
    e0, e1 = results["mixed"]["epochs"][:2]
    checks = [(f"mixed distinct sources {m['distinct']:.2f} vs random {exp_distinct:.2f}: "
               f"{100 * gap:+.1f}% below (target: within 10%)", gap <= 0.10),
              (f"mixed same-image pairs/batch {m['pairs']:.4f} vs random {exp_pairs:.4f} "
               f"(target: at or below random)", m["pairs"] <= exp_pairs),
              (f"mixed / unmixed samples/s: {ratio:.2f}x over {args.epochs} alternated epochs each (per-epoch "
               f"ratios {' '.join(f'{x:.2f}' for x in ratios)}) (target: >= 0.9x)", ratio >= 0.9),
              ("mixed epochs 1 and 2 differ in order", e0 != e1)]
    for text, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    return all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--images", type=int, nargs="+", default=[64, 256], help="images per shard, one run each")
    ap.add_argument("--variants", type=int, default=4, help="variants (K) per image")
    ap.add_argument("--row-kb", type=int, default=8, help="payload per row, KiB")
    ap.add_argument("--buffer", type=int, default=2000, help="mixed loader's shuffle buffer (samples)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per loader and size, alternated (>= 2)")
    args = ap.parse_args(argv)

    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False,
             log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.target_max_block_size = ROWS_PER_BLOCK * (args.row_kb * 1024 + 64)
    ok = True
    try:
        with tempfile.TemporaryDirectory(prefix="vosr-bench-mixing-") as tmp:
            warm = write_shards(Path(tmp), 2, 16, args.variants, 1)
            run_epoch(ray.data.read_parquet(warm).streaming_split(1)[0], False, 0, 0)  # warm-up: workers, imports
            for images in args.images:
                ok &= bench_size(Path(tmp), args, images)
    finally:
        ray.shutdown()
    print(f"\n{'ALL PASS' if ok else 'SOME FAIL'} ({time.perf_counter() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
