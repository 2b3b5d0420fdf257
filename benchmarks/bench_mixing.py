"""Batch mixing of the training loader (issue 16): 16 feature-like shards, one source each, written sorted by
(id, variant) with row groups of 64 rows, as precompute writes them; read into batches of 16 the old way (shards in
file order, 64-row local buffer) and the mixed way (training/data.py: seeded per-epoch row-group order across
shards, blocks spread by variant, 2000-sample buffer).

    .venv/bin/python benchmarks/bench_mixing.py [--shards 16] [--images 256] [--variants 4] [--row-kb 8]

The default set (16,384 rows) is 8x the 2000-sample buffer, so the buffer cannot hold the whole epoch (with a set
that fits in it, any loader looks random).

Prints, for each loader and for random sampling (batches of a uniform random permutation, simulated):
  - the mean number of distinct sources per batch of 16 (target: mixed within 10% of random);
  - the same-image pair rate: mean number of pairs of rows of one image per batch (and the share of batches
    holding one);
then the loaders' samples/s over 2 epochs each (target: mixed >= 0.9x the unmixed loader), run alternately twice
on one local Ray (2 CPUs) with the start-up excluded. CPU only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.data import _SplitFilter, batch_iter_kwargs, mixed_shards_datasource  # noqa: E402

BATCH = 16


def write_shards(folder: Path, shards: int, images: int, variants: int, row_kb: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        ids = [f"src{s:02d}_img{i:04d}" for i in range(images) for _ in range(variants)]
        var = [v for _ in range(images) for v in range(variants)]
        payload = [rng.bytes(row_kb * 1024) for _ in ids]
        table = pa.table({"id": ids, "variant": pa.array(var, pa.int32()), "source": [s] * len(ids),
                          "payload": pa.array(payload, pa.binary())})
        p = folder / f"shard-{s:05d}.parquet"
        pq.write_table(table, p, row_group_size=64, compression="none")
        paths.append(str(p))
    return paths


def batch_stats(batches: list[tuple[list[int], list[str]]]) -> tuple[float, float, float]:
    distinct, pairs, any_pair = [], [], []
    for sources, ids in batches:
        distinct.append(len(set(sources)))
        _, counts = np.unique(ids, return_counts=True)
        p = int((counts * (counts - 1) // 2).sum())
        pairs.append(p)
        any_pair.append(p > 0)
    return float(np.mean(distinct)), float(np.mean(pairs)), float(np.mean(any_pair))


def random_batches(sources: np.ndarray, ids: np.ndarray, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        perm = rng.permutation(len(ids))
        for i in range(0, len(perm) - BATCH + 1, BATCH):
            sel = perm[i:i + BATCH]
            out.append((sources[sel].tolist(), ids[sel].tolist()))
    return out[:n]


def run_loader(ds, buffer: int, epochs: int = 2) -> tuple[list, float, int]:
    import ray  # noqa: F401

    it = ds.streaming_split(1)[0]
    batches, rows = [], 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for b in it.iter_batches(**batch_iter_kwargs(BATCH, buffer, seed=0, rank=0, epoch=epoch)):
            batches.append((b.column("source").to_pylist(), b.column("id").to_pylist()))
            rows += b.num_rows
    return batches, time.perf_counter() - t0, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--images", type=int, default=256, help="images per shard")
    ap.add_argument("--variants", type=int, default=4, help="variants (K) per image")
    ap.add_argument("--row-kb", type=int, default=8, help="payload per row, KiB")
    ap.add_argument("--buffer", type=int, default=2000, help="mixed loader's shuffle buffer (samples)")
    args = ap.parse_args(argv)

    import ray

    with tempfile.TemporaryDirectory(prefix="vosr-bench-mixing-") as tmp:
        paths = write_shards(Path(tmp), args.shards, args.images, args.variants, args.row_kb)
        n_rows = args.shards * args.images * args.variants
        print(f"{args.shards} shards x {args.images} images x {args.variants} variants = {n_rows} rows of "
              f"{args.row_kb} KiB; batches of {BATCH}")
        ray.init(address="local", num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False,
                 log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        keep = _SplitFilter(0.0, keep_holdout=False)

        def unmixed():
            return ray.data.read_parquet(paths).map_batches(keep, batch_format="pyarrow"), 64

        def mixed():
            return (ray.data.read_datasource(mixed_shards_datasource(paths, "", seed=0))
                    .map_batches(keep, batch_format="pyarrow"), args.buffer)

        try:
            run_loader(*unmixed(), epochs=1)  # warm-up: workers started, imports done
            results: dict[str, dict] = {"unmixed": {"t": 0.0, "rows": 0}, "mixed": {"t": 0.0, "rows": 0}}
            for _ in range(2):  # alternate, so load drift on a shared machine hits both alike
                for name, make in (("unmixed", unmixed), ("mixed", mixed)):
                    batches, dt, rows = run_loader(*make())
                    r = results[name]
                    r["t"] += dt
                    r["rows"] += rows
                    r["batches"] = batches
        finally:
            ray.shutdown()

    all_sources = np.repeat(np.arange(args.shards), args.images * args.variants)
    all_ids = np.array([f"src{s:02d}_img{i:04d}" for s in range(args.shards) for i in range(args.images)
                        for _ in range(args.variants)])
    rnd = batch_stats(random_batches(all_sources, all_ids, 4000))
    print(f"{'loader':<10} {'distinct sources/batch':>23} {'same-image pairs/batch':>23} "
          f"{'batches with a pair':>20} {'samples/s':>10}")
    print(f"{'random':<10} {rnd[0]:>23.2f} {rnd[1]:>23.3f} {rnd[2]:>20.3f} {'':>10}")
    for name in ("unmixed", "mixed"):
        r = results[name]
        st = batch_stats(r["batches"])
        r["sps"] = r["rows"] / r["t"]
        r["stats"] = st
        print(f"{name:<10} {st[0]:>23.2f} {st[1]:>23.3f} {st[2]:>20.3f} {r['sps']:>10.0f}")
    m = results["mixed"]
    gap = (rnd[0] - m["stats"][0]) / rnd[0]
    ratio = m["sps"] / results["unmixed"]["sps"]
    e0 = [ids for _, ids in m["batches"][:n_rows // BATCH]]
    e1 = [ids for _, ids in m["batches"][n_rows // BATCH:2 * (n_rows // BATCH)]]
    print(f"mixed distinct sources vs random: {100 * gap:+.1f}% below (target: within 10%)")
    print(f"mixed / unmixed samples/s: {ratio:.2f}x (target: >= 0.9x)")
    print(f"mixed epochs 1 and 2 differ in order: {e0 != e1}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
