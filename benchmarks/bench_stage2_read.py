"""Curation stage 2's Ray Data reads and their row filters, at growing sizes (the library's filter and
aggregate in place of hand-written batch functions, measured with the code as it stands).

    flock /tmp/vosr-heavy.lock .venv/bin/python benchmarks/bench_stage2_read.py [--sizes 100000 400000] [--repeats 2]

Synthetic stage-1 ledgers (the ledger columns stage 2 reads; 80% of the rows "ok", the rest a filter code; half
the ok rows without a listed category; a 16-dim embedding) are written under a temporary curate output, then on a
local Ray with 2 CPUs it times, per size, best of --repeats:
  - read:      `curate.read_ok_rows` (read the ledgers, keep the ok rows, node keys, unlabelled flag, materialise);
  - centres:   `curate.fit_centres` on those rows (count the unlabelled rows, a seeded sample of them, k-means);
  - balance:   `curate.stage_balance` with a binding per-category cap (split the merged decisions by drop
               reason, cap each category), materialised;
  - kept:      `curate_schema.read_kept(...).count()` on curated shards holding the same rows, 70% kept;
and prints rows/s per step and the growth exponent log(t2/t1)/log(n2/n1) between consecutive sizes (about 1 is
linear). Ray start-up and a warm-up pass are excluded. CPU only.
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

from jobkit.config import config_from_dict  # noqa: E402
from pipelines import curate  # noqa: E402
from pipelines.curate_schema import CURATED_SCHEMA, SHARDS_DIR, read_kept  # noqa: E402
from pipelines.curation.stage1 import ledger_uri  # noqa: E402

ROWS_PER_FILE = 50_000
DIM = 16


def ledger_table(n: int, start: int, unit: str, rng: np.random.Generator) -> pa.Table:
    ok = rng.random(n) < 0.8
    labelled = rng.random(n) < 0.5
    ids = [f"{start + i:032x}" for i in range(n)]
    emb = rng.random((n, DIM), dtype=np.float32)
    return pa.table({
        "unit": [unit] * n, "row": np.arange(n, dtype=np.int32),
        "reason": np.where(ok, "ok", "too_small").tolist(),
        "id": ids, "width": rng.integers(256, 2048, n).astype(np.int32),
        "height": rng.integers(256, 2048, n).astype(np.int32),
        "gradient": rng.random(n).astype(np.float32), "sha256": [f"{start + i:064x}" for i in range(n)],
        "phash": rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64),
        "list_category": pa.array(np.where(labelled, "cat", None).tolist(), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(emb.ravel(), DIM).cast(pa.list_(pa.float32())),
        "fidelity": np.full(n, 100.0, np.float32), "native_scale": 1.0 + rng.random(n).astype(np.float32)})


def write_inputs(n: int, out: Path, seed: int = 0) -> list[str]:
    """Stage-1 ledgers for `n` rows under out (one file per ROWS_PER_FILE rows) and curated shards of the same
    rows under out/shards; returns the ledger keys."""
    rng = np.random.default_rng(seed)
    keys = []
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    for f, s in enumerate(range(0, n, ROWS_PER_FILE)):
        m = min(n, s + ROWS_PER_FILE) - s
        key = f"{f:024x}"  # block keys and ids have the lengths node keys expect (dedup.node_key)
        t = ledger_table(m, s, key, rng)
        path = Path(ledger_uri(str(out), key, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, path)
        keys.append(key)
        cols = {c: (t[c] if c in t.column_names else pa.nulls(m, CURATED_SCHEMA.field(c).type))
                for c in CURATED_SCHEMA.names if c != "kept"}
        cols["kept"] = pa.array(rng.random(m) < 0.7)
        pq.write_table(pa.table(cols).select(CURATED_SCHEMA.names).cast(CURATED_SCHEMA),
                       out / SHARDS_DIR / f"part-{f:05d}.parquet")
    return keys


def digest(decided, centres) -> str:
    """Hash of the decisions (id, category, drop reason; sorted by id) and the k-means centres: equal before and
    after a change of how the rows are filtered (computed after the timed part)."""
    import hashlib

    import ray

    t = pa.concat_tables([x.select(["id", "category", "drop_reason"]) for x in ray.get(decided.to_arrow_refs())])
    t = t.sort_by("id")
    h = hashlib.sha256()
    for c in t.column_names:
        h.update(str(t[c].to_pylist()).encode())
    h.update(np.ascontiguousarray(centres, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def run_once(cfg, out: Path, keys: list[str]) -> dict:
    gens = dict.fromkeys(keys, 0)
    t0 = time.perf_counter()
    meta, n_ok = curate.read_ok_rows(cfg, keys, gens, semantic=False)
    t1 = time.perf_counter()
    centres, n_unlab = curate.fit_centres(meta, cfg.curate, cfg.run.seed)
    t2 = time.perf_counter()
    decided = curate.stage_balance(meta, None, centres, cfg.curate, cfg.run.seed).materialize()
    n_decided = decided.count()
    tb = time.perf_counter()
    n_kept = read_kept(str(out)).count()
    t3 = time.perf_counter()
    return {"digest": digest(decided, centres), "read": t1 - t0, "centres": t2 - t1, "balance": tb - t2, "kept": t3 - tb, "ok": n_ok,
            "unlabelled": n_unlab, "decided": n_decided, "kept_rows": n_kept, "k": len(centres)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000], help="ledger rows, one run each")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per size (best is printed)")
    ap.add_argument("--object-store-mib", type=int, default=1500)
    args = ap.parse_args()

    import ray
    import ray.data

    from jobkit.ray_env import start_local_ray

    start_local_ray({"PYTHONPATH": str(ROOT)}, num_cpus=2, object_store_memory=args.object_store_mib * 2**20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            warm = Path(tmp) / "warm"
            cfg = config_from_dict({"curate": {"output": str(warm), "balance": {"per_category_cap": 500}}})
            run_once(cfg, warm, write_inputs(2_000, warm))
            for n in args.sizes:
                out = Path(tmp) / f"n{n}"
                keys = write_inputs(n, out)
                cfg = config_from_dict({"curate": {"output": str(out), "balance": {"per_category_cap": n // 20}}})
                runs = [run_once(cfg, out, keys) for _ in range(args.repeats)]
                best = {s: min(r[s] for r in runs) for s in ("read", "centres", "balance", "kept")}
                r = runs[0]
                counts = ("ok", "unlabelled", "decided", "kept_rows")
                assert all(tuple(x[c] for c in counts) == tuple(r[c] for c in counts) for x in runs)
                rows.append({"n": n, **best})
                assert len({x["digest"] for x in runs}) == 1
                print(f"n={n:>9,}  digest {r['digest']}  ok {r['ok']:,}  unlabelled {r['unlabelled']:,}  decided {r['decided']:,}  "
                      f"kept {r['kept_rows']:,}\n   "
                      + "  ".join(f"{s} {best[s]:.2f}s ({n / best[s]:,.0f} rows/s)" for s in best), flush=True)
    finally:
        ray.shutdown()
    for a, b in zip(rows, rows[1:]):
        print(f"growth {a['n']:,} -> {b['n']:,}: " + "  ".join(
            f"{s} {math.log(b[s] / a[s]) / math.log(b['n'] / a['n']):.2f}" for s in ("read", "centres", "balance", "kept")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
