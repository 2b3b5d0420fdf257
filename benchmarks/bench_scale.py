"""Scale benchmarks for curation stage 2 (dedup) and precompute, printing growth exponents measured in one run.

    flock /tmp/vosr-heavy.lock .venv/bin/python benchmarks/bench_scale.py --only dedup \\
        [--sizes 100000 1000000 4000000] [--ray-sizes 100000 1000000] [--k 6 8] [--quick]

Dedup: synthetic stage-1 ledger rows (uniform random 64-bit pHashes; planted near pairs at distances 1..k on
1% of the rows; exact duplicates (same pixels: same sha256 and pHash) on 1%; a flat group of 0.5% of the rows
sharing one pHash; clusters of 100 near-copies (1..k bits from their original) holding 1% of the rows). Per size:
  - one process: lsh.near_duplicate_edges + scipy connected components on the same rows;
  - Ray (2 CPUs): the curate job's stage 2 dedup (`curate.stage_dedup` on the rows read from parquet ledgers,
    decisions materialized);
each printing seconds, planted pairs found / planted, driver peak RSS (each run in its own process), and the
growth exponent log(t2/t1)/log(n2/n1) between consecutive sizes. Targets (docs/scale.md): one process, k = 6 and 8,
time(4M)/time(1M) <= 4.8 with every planted pair found; Ray at 1M <= 5x the one-process time.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ============================================================================ dedup

def synthetic_hashes(n: int, k: int, seed: int = 0, cluster_size: int = 100):
    """(phash int64 [n], same_pixels bool [n] (row is an exact copy of its source), planted (a, b) index pairs).

    Planted: near pairs at distances 1..k, exact duplicates, a flat group, clusters of near-copies."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    exact = np.zeros(n, bool)
    perm = rng.permutation(n)
    take = iter(np.split(perm, np.cumsum([n // 100] * 2 + [n // 100] * 2 + [n // 200])))
    src, dst = next(take), next(take)  # near pairs: dst = src with 1..k flipped bits

    def flips(count):
        d = 1 + np.arange(count) % k
        bits = rng.random((count, 64)).argsort(axis=1)
        mask = np.zeros(count, np.uint64)
        for c in range(k):
            on = d > c
            mask[on] |= np.uint64(1) << bits[on, c].astype(np.uint64)
        return mask

    h[dst] = h[src] ^ flips(len(src))
    planted = [np.stack([src, dst], 1)]
    esrc, edst = next(take), next(take)  # exact duplicates
    h[edst] = h[esrc]
    exact[edst] = True
    planted.append(np.stack([esrc, edst], 1))
    flat = next(take)  # flat images sharing one hash
    h[flat] = h[flat[0]]
    planted.append(np.stack([np.full(len(flat) - 1, flat[0]), flat[1:]], 1))
    rest = next(take)
    members = rest[: (n // 100) // cluster_size * cluster_size].reshape(-1, cluster_size)
    for m in members:  # clusters: the first member is the original, the others 1..k bits from it
        h[m[1:]] = h[m[0]] ^ flips(len(m) - 1)
        planted.append(np.stack([np.full(len(m) - 1, m[0]), m[1:]], 1))
    pairs = np.concatenate(planted)
    return h.view(np.int64), exact, np.sort(pairs, axis=1)


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(a), np.int32), (a, b)), shape=(n, n))
    return connected_components(g, directed=False)[1]


def dedup_one_process(n: int, k: int, seed: int, cap: int) -> dict:
    import scipy.sparse.csgraph  # noqa: F401 - imported before the clock starts

    from pipelines.curation import lsh

    h, _, planted = synthetic_hashes(n, k, seed)
    t0 = time.perf_counter()
    a, b, overflow = lsh.near_duplicate_edges(h, k, cap)
    t_search = time.perf_counter() - t0
    label = _components(n, a, b)
    secs = time.perf_counter() - t0
    found = int((label[planted[:, 0]] == label[planted[:, 1]]).sum())
    # pair-level recall: every planted pair of distinct hashes is one verified edge between the group firsts
    uniq, first, counts, inverse = lsh.group_identical(h)
    pa_, pb_ = first[inverse[planted[:, 0]]], first[inverse[planted[:, 1]]]
    distinct = pa_ != pb_
    e = set((np.minimum(a, b) * n + np.maximum(a, b)).tolist())
    want = np.minimum(pa_, pb_)[distinct] * n + np.maximum(pa_, pb_)[distinct]
    pair_found = int(sum(x in e for x in want.tolist()))
    return {"n": n, "k": k, "seconds": round(secs, 3), "search_seconds": round(t_search, 3),
            "tables": len(lsh.plan_tables(k, len(uniq))), "edges": int(len(a)),
            "planted": int(len(planted)), "found": found, "distinct_planted": int(distinct.sum()),
            "distinct_found": pair_found, "overflow": overflow, "peak_rss_mib": _peak_rss_mib()}


def write_ledgers(n: int, k: int, seed: int, folder: Path, rows_per_file: int = 200_000) -> np.ndarray:
    """Synthetic stage-1 "ok" rows (the columns stage 2's dedup reads) as parquet files; returns planted pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    h, exact, planted = synthetic_hashes(n, k, seed)
    rng = np.random.default_rng(seed + 1)
    ids = np.array([f"{x:032x}" for x in range(n)])
    sha = np.array([f"{x:064x}" for x in range(n)], dtype=object)
    src_of = np.arange(n)
    src_of[planted[:, 1][exact[planted[:, 1]]]] = planted[:, 0][exact[planted[:, 1]]]
    sha = sha[src_of]  # exact copies carry their source's pixel hash
    w = rng.integers(256, 2048, n)
    for f, s in enumerate(range(0, n, rows_per_file)):
        e = min(n, s + rows_per_file)
        unit = f"{f:024d}"
        pq.write_table(pa.table({
            "unit": [unit] * (e - s), "row": np.arange(e - s, dtype=np.int32), "id": ids[s:e],
            "width": w[s:e].astype(np.int32), "height": w[s:e].astype(np.int32),
            "fidelity": np.full(e - s, 100.0, np.float32), "native_scale": 1.0 + rng.random(e - s).astype(np.float32),
            "sha256": list(sha[s:e]), "phash": h[s:e]}),
            folder / f"ledger-{f:05d}.parquet")
    return planted


def dedup_ray(n: int, k: int, seed: int, cap: int, object_store_mib: int) -> dict:
    import ray
    import ray.data

    from jobkit.config import config_from_dict
    from pipelines import curate
    from pipelines.curation import dedup

    with tempfile.TemporaryDirectory() as tmp:
        # the ledgers are written by another process: the driver's peak RSS is stage 2's own
        _in_subprocess(["--_worker", "ledgers", "--n", str(n), "--k", str(k), "--seed", str(seed), "--out", tmp])
        planted = np.load(Path(tmp) / "planted.npy")
        ray.init(num_cpus=2, object_store_memory=object_store_mib * 2**20, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            ccfg = config_from_dict({"curate": {"dedup": {"hamming": k, "max_bucket": cap}}}).curate
            t0 = time.perf_counter()
            files = sorted(str(f) for f in Path(tmp).glob("*.parquet"))
            meta = (ray.data.read_parquet(files).map_batches(dedup.add_node_keys, batch_format="pyarrow")
                    .materialize())
            t_meta = time.perf_counter() - t0
            t1 = time.perf_counter()
            dups, info = curate.stage_dedup(meta, ccfg)
            dec = dups.select_columns(["id", "duplicate_of"]).materialize() if dups is not None else None
            secs = time.perf_counter() - t1
            stage_peak = _peak_rss_mib()  # before the benchmark's own read-back of every decision below
            # recall: both rows of a planted pair end with the same kept representative (read back after the
            # timed part: benchmark bookkeeping only)
            found = _ray_pairs_together(dec, planted, n) if dec is not None else 0
        finally:
            ray.shutdown()
    return {"n": n, "k": k, "seconds": round(secs, 3), "meta_seconds": round(t_meta, 3),
            "planted": int(len(planted)), "found": found, "edges": info.get("duplicate_edges"),
            "components": info.get("components"), "overflow": info.get("bucket_overflow"),
            "tables": info.get("lsh_tables"), "peak_rss_mib": stage_peak, "peak_rss_mib_with_check": _peak_rss_mib()}


def _ray_pairs_together(dec, planted: np.ndarray, n: int) -> int:
    """Planted pairs whose rows share a representative; the decisions are read back only for this check
    (benchmark bookkeeping, after the timed part)."""
    rep = np.arange(n)
    t = dec.to_arrow_refs()
    import ray
    for block in ray.get(t):
        a = np.array([int(x, 16) for x in block["id"].to_pylist()], np.int64)
        b = np.array([int(x, 16) for x in block["duplicate_of"].to_pylist()], np.int64)
        rep[a] = b
    return int((rep[planted[:, 0]] == rep[planted[:, 1]]).sum())


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _in_subprocess(args: list[str]) -> dict:
    """Run one measurement in a fresh process (so its peak RSS is its own); returns its JSON result."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=str(ROOT))
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"bench_scale worker {args} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1])


def _exponents(rows: list[dict]) -> list[str]:
    out = []
    for r1, r2 in zip(rows, rows[1:]):
        ratio = r2["seconds"] / max(r1["seconds"], 1e-9)
        out.append(f"{r1['n']}->{r2['n']}: x{ratio:.2f} time for x{r2['n'] / r1['n']:.0f} rows, exponent "
                   f"{math.log(ratio) / math.log(r2['n'] / r1['n']):.2f}")
    return out


def bench_dedup_scale(sizes: list[int], ray_sizes: list[int], ks: list[int], seed: int, cap: int,
                      object_store_mib: int) -> bool:
    ok = True
    for k in ks:
        print(f"== dedup, k={k}: one process (lsh.near_duplicate_edges + scipy components)", flush=True)
        one = {}
        for n in sizes:
            r = _in_subprocess(["--_worker", "one", "--n", str(n), "--k", str(k), "--seed", str(seed),
                                "--cap", str(cap)])
            one[n] = r
            good = r["found"] == r["planted"] and r["distinct_found"] == r["distinct_planted"]
            ok &= good
            print(f"  n={n:>9,} {r['seconds']:8.2f} s (search {r['search_seconds']:.2f} s, {r['tables']} tables)"
                  f"  planted found {r['found']}/{r['planted']} (distinct-hash pairs {r['distinct_found']}/"
                  f"{r['distinct_planted']})  edges {r['edges']}  overflow {r['overflow']}  "
                  f"peak RSS {r['peak_rss_mib']} MiB", flush=True)
        rows = [one[n] for n in sizes]
        for line in _exponents(rows):
            print("  growth " + line)
        for r1, r2 in zip(rows, rows[1:]):
            if r2["n"] == 4 * r1["n"]:
                ratio = r2["seconds"] / r1["seconds"]
                print(f"  target time({r2['n']:,})/time({r1['n']:,}) = {ratio:.2f} <= 4.8: "
                      f"{'met' if ratio <= 4.8 else 'NOT met'}")
        if not ray_sizes:
            continue
        print(f"== dedup, k={k}: Ray stage 2 (curate.stage_dedup, 2 CPUs, rows from parquet ledgers)", flush=True)
        rr = []
        for n in ray_sizes:
            r = _in_subprocess(["--_worker", "ray", "--n", str(n), "--k", str(k), "--seed", str(seed),
                                "--cap", str(cap), "--object-store-mib", str(object_store_mib)])
            rr.append(r)
            ok &= r["found"] == r["planted"]
            base = one.get(n)
            vs = f"  = {r['seconds'] / base['seconds']:.1f}x one process" if base else ""
            print(f"  n={n:>9,} {r['seconds']:8.2f} s (+{r['meta_seconds']:.2f} s read + node keys){vs}  planted "
                  f"found {r['found']}/{r['planted']}  edges {r['edges']} ({r['components']} components)  "
                  f"overflow {r['overflow']}  driver peak RSS {r['peak_rss_mib']} MiB (with the recall check's "
                  f"read-back {r['peak_rss_mib_with_check']} MiB)", flush=True)
        for line in _exponents(rr):
            print("  growth " + line)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["dedup", "precompute"], default=None,
                    help="run one section (default: every section present)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    ap.add_argument("--ray-sizes", type=int, nargs="*", default=None,
                    help="sizes for the Ray stage 2 run (default: --sizes; none: skip Ray)")
    ap.add_argument("--k", type=int, nargs="+", default=[6, 8])
    ap.add_argument("--cap", type=int, default=1000, help="curate.dedup.max_bucket")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--object-store-mib", type=int, default=3000)
    ap.add_argument("--quick", action="store_true", help="small sizes (20k, 80k), k=6 only")
    ap.add_argument("--_worker", choices=["one", "ray", "ledgers"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker == "ledgers":
        np.save(Path(args.out) / "planted.npy", write_ledgers(args.n, args.k[0], args.seed, Path(args.out)))
        print(json.dumps({"written": args.n}))
        return 0
    if args._worker:
        fn = dedup_one_process if args._worker == "one" else dedup_ray
        extra = {"object_store_mib": args.object_store_mib} if args._worker == "ray" else {}
        print(json.dumps(fn(args.n, args.k[0], args.seed, args.cap, **extra)))
        return 0
    if args.quick:
        args.sizes, args.k = [20_000, 80_000], [6]
        args.ray_sizes = args.sizes if args.ray_sizes is None else args.ray_sizes
    ray_sizes = args.sizes if args.ray_sizes is None else args.ray_sizes
    ok = True
    if args.only in (None, "dedup"):
        ok &= bench_dedup_scale(args.sizes, ray_sizes, args.k, args.seed, args.cap, args.object_store_mib)
    if args.only == "precompute":
        print("precompute at growing sizes: benchmarks/bench_scale_precompute.py")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
