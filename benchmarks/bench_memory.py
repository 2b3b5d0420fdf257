"""Peak memory per process against the corpus size, one section per stage (the target: no process holds memory
that grows with the corpus). Each measurement runs in a fresh child process; sizes span at least 8x.

    flock /tmp/vosr-heavy.lock .venv/bin/python benchmarks/bench_memory.py --section stage2 \\
        [--sizes 1000000 2000000 4000000] [--rows-per-block 16384]
    flock /tmp/vosr-heavy.lock .venv/bin/python benchmarks/bench_memory.py --section search \\
        [--hashes 1000000 4000000 16000000] [--task-hashes 1000000] [--run 100000]
    flock /tmp/vosr-heavy.lock .venv/bin/python benchmarks/bench_memory.py --section kmeans \\
        [--kmeans-sizes 65536:512 131072:1024 262144:2048] [--dim 196] [--full]
    flock /tmp/vosr-heavy.lock .venv/bin/python benchmarks/bench_memory.py --section write [--ledger-mib 64 256 1024]

Sections (`--section` takes several; default: all of them):
  stage2  curation stage 2 (dedup + balance + write) on a local Ray with 2 CPUs over synthetic stage-1 ledgers
          (bench_scale.py's planted pHashes; --dim-float embeddings; half the rows with a listed category; a
          per-category cap that binds). Prints the driver's peak RSS per size and its slope in bytes per row, per
          phase, and for every task kind the peak RSS growth of its calls (jobkit/memprobe.py: each call resets
          the worker's VmHWM and logs peak - RSS before; workers are reused, so this is the call's own growth).
  search  the near-duplicate search alone (dedup.near_search) on a local Ray over distinct hashes with planted
          near pairs, at a fixed curate.dedup.search_task_hashes: per-task peak growth per size (flat = within
          20%), every planted pair found; optionally (--run) a run of that many near-copies of one hash added to
          the smallest size (bounded memory, counted overflow). --baseline also measures the search task of the
          previous design (all distinct hashes in every task, half the tables) in a child process.
  kmeans  balance.kmeans_fit (the new fit) and tests/helpers/kmeans_reference.py (the fit before: k-means++ over
          the whole sample, Lloyd with a full n x k distance matrix) per (samples:clusters) size, each in a child
          process: seconds, peak RSS, inertia; the growth exponent of the new fit's time in n x k and the 1M x 4096
          time extrapolated from it. --full also runs the shipped setting (1,048,576 x 4,096) through the job's
          own path (curate.fit_centres on a local Ray with 2 CPUs; the k-means task's peak from jobkit.memprobe).
  write   writer.write_unit_shard on one block's ledger of --ledger-mib MiB (images of --image-kib KiB): peak
          RSS growth of the call / the ledger's bytes (target < 1.5).
CPU only. The machine this ran on was shared: the numbers carry its noise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MiB = 2**20


def _child(args: list[str], env: dict | None = None) -> dict:
    """Run one measurement in a fresh process of this script; returns the JSON it printed last."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"bench_memory child {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return json.loads(lines[-1])


def _slope(rows: list[tuple[int, float]]) -> float:
    """Least-squares slope of y against n (bytes per row)."""
    n = np.array([r[0] for r in rows], float)
    y = np.array([r[1] for r in rows], float)
    if len(rows) < 2:
        return float("nan")
    return float(np.polyfit(n, y, 1)[0])


def _mib(x: float) -> str:
    return f"{x / MiB:8.1f} MiB"


def _task_peaks(log: Path) -> dict[str, dict]:
    """Per task kind: calls, the largest peak growth, and the rows of the call that had it."""
    out: dict[str, dict] = {}
    if not log.exists():
        return out
    for line in log.read_text().splitlines():
        r = json.loads(line)
        cur = out.setdefault(r["kind"], {"calls": 0, "growth": 0, "rows_in": 0, "peak": 0})
        cur["calls"] += 1
        if r["growth"] >= cur["growth"]:
            cur["growth"], cur["rows_in"] = r["growth"], r["rows_in"]
        cur["peak"] = max(cur["peak"], r["peak"])
    return out


# ================================================================================================ stage 2

def write_stage1_ledgers(n: int, out: Path, rows_per_block: int, dim: int, seed: int = 0, k: int = 6) -> list[str]:
    """Synthetic stage-1 ledgers (STAGE1_SCHEMA) of n rows under a curate output `out`: 90% "ok"; bench_scale's
    planted pHashes (near pairs, exact copies, a flat group, clusters of near-copies); half the rows with one of
    4 listed categories; 96-byte image blobs; a `dim`-float embedding. Returns the block keys."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_scale import synthetic_hashes

    from pipelines.curate_schema import STAGE1_SCHEMA
    from pipelines.curation.stage1 import ledger_uri

    h, _, _ = synthetic_hashes(n, k, seed)
    rng = np.random.default_rng(seed + 1)
    keys = []
    blob = 96
    for b, s in enumerate(range(0, n, rows_per_block)):
        m = min(n, s + rows_per_block) - s
        key = f"{b:024x}"
        ok = rng.random(m) < 0.9
        cat = rng.integers(0, 8, m)
        emb = rng.random((m, dim), dtype=np.float32)
        data = rng.integers(0, 256, m * blob, dtype=np.uint8).tobytes()
        offs = np.arange(0, (m + 1) * blob, blob, dtype=np.int32)
        w = rng.integers(256, 2048, m).astype(np.int32)
        t = pa.table({
            "unit": [key] * m, "row": np.arange(m, dtype=np.int32),
            "source": [f"synthetic://{s + i}" for i in range(m)],
            "reason": np.where(ok, "ok", "too_small").tolist(), "detail": pa.nulls(m, pa.string()),
            "list_category": pa.array([f"cat-{c}" if c < 4 else None for c in cat.tolist()], pa.string()),
            "id": [f"{s + i:032x}" for i in range(m)],
            "image": pa.Array.from_buffers(pa.binary(), m, [None, pa.py_buffer(offs.tobytes()), pa.py_buffer(data)]),
            "format": ["jpeg"] * m, "width": w, "height": w,
            "sha256": [f"{s + i:064x}" for i in range(m)], "phash": h[s:s + m], "dhash": h[s:s + m],
            "gradient": rng.random(m).astype(np.float32), "entropy": rng.random(m).astype(np.float32),
            "embedding": pa.FixedSizeListArray.from_arrays(emb.ravel(), dim).cast(pa.list_(pa.float32())),
            "sharpness": rng.random(m).astype(np.float32), "fidelity": np.full(m, 100.0, np.float32),
            "declared_type": ["image/jpeg"] * m,
            **({"metadata": pa.nulls(m, pa.string())} if "metadata" in STAGE1_SCHEMA.names else {}),
        }).cast(STAGE1_SCHEMA)
        path = Path(ledger_uri(str(out), key, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, path, compression="zstd")
        keys.append(key)
    return keys


def stage2_child(n: int, tmp: str, rows_per_block: int, dim: int, object_store_mib: int, local_max_edges: int,
                 log: str) -> dict:
    import ray
    import ray.data

    from jobkit.config import config_from_dict
    from jobkit.memprobe import ENV, peak_bytes, reset_peak, rss_bytes
    from jobkit.ray_env import start_local_ray
    from pipelines import curate

    keys = json.loads((Path(tmp) / "keys.json").read_text())
    warm_keys = json.loads((Path(tmp) / "warm_keys.json").read_text())
    start_local_ray({"PYTHONPATH": str(ROOT), ENV: log}, num_cpus=2, object_store_memory=object_store_mib * MiB,
                    log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    curate.set_shuffle(config_from_dict({}).curate.shuffle)  # as the job does (curate.shuffle)

    def cfg_for(out: str, rows: int):
        return config_from_dict({"curate": {
            "output": out, "dedup": {"hamming": 6, "max_bucket": 1000, "local_max_edges": local_max_edges},
            "balance": {"per_category_cap": max(1, rows // 20)}}})

    def stage2(cfg, ks, phases: dict | None):
        marks = {}

        def mark(name, t0):
            if phases is not None:
                phases[name] = {"seconds": round(time.perf_counter() - t0, 2), "peak": peak_bytes()}
                reset_peak()
            marks[name] = time.perf_counter()
        ccfg = cfg.curate
        t = time.perf_counter()
        gens, fp2, _ = curate.stage2_begin(cfg, ks, False)
        meta, n_ok = curate.read_ok_rows(cfg, ks, gens, False)
        mark("read", t)
        t = time.perf_counter()
        dups, info = curate.stage_dedup(meta, ccfg)
        mark("dedup", t)
        t = time.perf_counter()
        centres, _ = curate.fit_centres(meta, ccfg, cfg.run.seed)
        mark("centres", t)
        t = time.perf_counter()
        decisions = curate.stage_balance(meta, dups, centres, ccfg, cfg.run.seed)
        mark("balance", t)
        t = time.perf_counter()
        totals, written, _ = curate.write_all(decisions, ks, gens, ccfg, fp2)
        mark("write", t)
        return n_ok, info, totals, written

    try:
        stage2(cfg_for(str(Path(tmp) / "warm"), 4000), warm_keys, None)  # workers, imports, Ray Data's actors
        Path(log).unlink(missing_ok=True)
        before = rss_bytes()
        reset_peak()
        phases: dict = {}
        t0 = time.perf_counter()
        n_ok, info, totals, written = stage2(cfg_for(str(Path(tmp) / "out"), n), keys, phases)
        secs = time.perf_counter() - t0
    finally:
        ray.shutdown()
    peak = max(p["peak"] for p in phases.values())
    return {"n": n, "ok": n_ok, "seconds": round(secs, 2), "rss_before": before, "peak": peak,
            "phases": phases, "kept": totals.get("kept"), "duplicates": totals.get("duplicates"),
            "capped": totals.get("capped"), "shards": written, "components": info.get("components"),
            "edges": info.get("duplicate_edges"), "overflow": info.get("bucket_overflow")}


def section_stage2(args) -> None:
    print(f"== stage 2 (dedup + balance + write), 2 CPUs, {args.rows_per_block} rows per block, "
          f"embedding dim {args.dim}", flush=True)
    res = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="vosr-mem-s2-") as tmp:
            _child(["--_child", "ledgers", "--n", str(n), "--tmp", tmp, "--rows-per-block", str(args.rows_per_block),
                    "--dim", str(args.dim)])
            log = Path(tmp) / "task-peaks.jsonl"
            r = _child(["--_child", "stage2", "--n", str(n), "--tmp", tmp, "--rows-per-block",
                        str(args.rows_per_block), "--dim", str(args.dim), "--object-store-mib",
                        str(args.object_store_mib), "--local-max-edges", str(args.local_max_edges),
                        "--log", str(log)])
            r["tasks"] = _task_peaks(log)
        res.append(r)
        ph = "  ".join(f"{k} {v['seconds']:.1f}s/{v['peak'] / MiB:.0f}MiB" for k, v in r["phases"].items())
        print(f"  n={n:>9,} {r['seconds']:7.1f} s  driver: RSS before {_mib(r['rss_before'])}, peak {_mib(r['peak'])}"
              f" (+{(r['peak'] - r['rss_before']) / MiB:.1f} MiB)  ok {r['ok']:,} kept {r['kept']:,} dup "
              f"{r['duplicates']:,} capped {r['capped']:,} shards {r['shards']}  components {r['components']} "
              f"edges {r['edges']}\n      phases (seconds / driver peak): {ph}", flush=True)
        for kind, t in sorted(r["tasks"].items()):
            print(f"      task {kind:<22} {t['calls']:5d} calls, largest growth {_mib(t['growth'])} "
                  f"(call with {t['rows_in']:,} input rows), worker peak {_mib(t['peak'])}")
    slope = _slope([(r["n"], r["peak"]) for r in res])
    print(f"  driver peak RSS slope {res[0]['n']:,} -> {res[-1]['n']:,} rows: {slope:.1f} B/row "
          f"(target < 10: {'met' if slope < 10 else 'NOT met'}); pairwise: " + ", ".join(
              f"{a['n']:,}->{b['n']:,} {(b['peak'] - a['peak']) / (b['n'] - a['n']):.1f}"
              for a, b in zip(res, res[1:])))
    for phase in res[0]["phases"]:
        s = _slope([(r["n"], r["phases"][phase]["peak"]) for r in res])
        print(f"    phase {phase:<8} driver peak slope {s:7.1f} B/row")
    kinds = sorted(set().union(*(r["tasks"] for r in res)))
    for kind in kinds:
        pts = [(r["n"], r["tasks"][kind]["growth"]) for r in res if kind in r["tasks"]]
        if len(pts) > 1:
            print(f"    task {kind:<22} largest growth per size: " + ", ".join(_mib(g).strip() for _, g in pts)
                  + f"; slope {_slope(pts):.2f} B/row")


# ================================================================================================ search

def search_child(n: int, k: int, cap: int, task_hashes: int, run: int, log: str, object_store_mib: int) -> dict:
    import pyarrow as pa
    import ray
    from bench_scale import synthetic_hashes
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from jobkit.memprobe import ENV
    from jobkit.ray_env import start_local_ray
    from pipelines.curation import dedup, lsh

    h, _, planted = synthetic_hashes(n, k, 0)
    if run:  # a run of `run` distinct near-copies (1..k bits) of one hash
        rng = np.random.default_rng(7)
        o = np.uint64(rng.integers(0, 2**63))
        bits = rng.random((run, 64)).argsort(axis=1)[:, :k]
        d = 1 + np.arange(run) % k
        mask = np.zeros(run, np.uint64)
        for c in range(k):
            on = d > c
            mask[on] |= np.uint64(1) << bits[on, c].astype(np.uint64)
        copies = (o ^ mask).view(np.int64)
        h = np.concatenate([h, [np.int64(o.view(np.int64))], copies])
        planted = np.concatenate([planted, np.stack([np.full(run, n), n + 1 + np.arange(run)], 1)])
    uniq, first, counts, inverse = lsh.group_identical(h)
    nodes = pa.table({"phash": uniq.view(np.int64), "count": counts})
    start_local_ray({"PYTHONPATH": str(ROOT), ENV: log}, num_cpus=2, object_store_memory=object_store_mib * MiB,
                    log_to_driver=False)
    try:
        per = 50_000
        refs = [ray.put(nodes.slice(s, per)) for s in range(0, len(uniq), per)]
        t0 = time.perf_counter()
        rows = [min(per, len(uniq) - s) for s in range(0, len(uniq), per)]
        pair_refs, pair_rows, overflow, plan = dedup.near_search(refs, rows, k, cap, search_tasks=2,
                                                                 task_hashes=task_hashes)
        pairs = [ray.get(r) for r in pair_refs]
        secs = time.perf_counter() - t0
    finally:
        ray.shutdown()
    ha = np.concatenate([p["ha"].to_numpy() for p in pairs]) if pairs else np.zeros(0, np.int64)
    hb = np.concatenate([p["hb"].to_numpy() for p in pairs]) if pairs else np.zeros(0, np.int64)
    ia, ib = np.searchsorted(uniq, ha.view(np.uint64)), np.searchsorted(uniq, hb.view(np.uint64))
    g = coo_matrix((np.ones(len(ia), np.int8), (ia, ib)), shape=(len(uniq), len(uniq)))
    label = connected_components(g, directed=False)[1]
    pa_, pb_ = inverse[planted[:, 0]], inverse[planted[:, 1]]
    found = int((label[pa_] == label[pb_]).sum())
    return {"n": int(len(h)), "distinct": int(len(uniq)), "seconds": round(secs, 2), "planted": int(len(planted)),
            "found": found, "edges": int(len(ha)), "overflow": overflow, "plan": plan}


def search_task_child(n: int, k: int, cap: int, task_hashes: int) -> dict:
    """The first (fullest) search task of the plan for n hashes, run by itself in this fresh process: its input
    blocks are built as the split pass would hand them over, then dedup._search_task (unwrapped) runs; peak RSS
    growth of the call."""
    import pyarrow as pa
    from bench_scale import synthetic_hashes

    from jobkit.memprobe import peak_bytes, reset_peak, rss_bytes
    from pipelines.curation import dedup, lsh

    h, _, _ = synthetic_hashes(n, k, 0)
    uniq, _, counts, _ = lsh.group_identical(h)
    del h
    _, groups = dedup.search_plan(len(uniq), k, task_hashes, 2)
    split, tabs = groups[0]
    if split:
        hb = dedup.hist_bits(split, len(uniq), task_hashes)
        v = lsh.block_value(uniq, split) >> (sum(w for _, w in split) - hb)
        sel = dedup.deal_bins(np.bincount(v, minlength=1 << hb), task_hashes)[v] == 0
        del v
    else:
        sel = np.ones(len(uniq), bool)
    ph, cnt = uniq[sel].view(np.int64), counts[sel]
    blocks = [pa.table({"phash": ph[s:s + 50_000], "count": cnt[s:s + 50_000]}) for s in range(0, len(ph), 50_000)]
    del uniq, counts, sel
    before = rss_bytes()
    reset_peak()
    dedup._search_task.__wrapped__(k, cap, tabs, *blocks)
    return {"n": n, "hashes": int(len(ph)), "tables": len(tabs), "growth": peak_bytes() - before}


def search_baseline_child(n: int, k: int, cap: int) -> dict:
    """The previous design's search task: every distinct hash (with its count) in one task, half the tables."""
    from bench_scale import synthetic_hashes

    from jobkit.memprobe import peak_bytes, reset_peak, rss_bytes
    from pipelines.curation import lsh

    h, _, _ = synthetic_hashes(n, k, 0)
    uniq, _, counts, _ = lsh.group_identical(h)
    tables = lsh.plan_tables(k, len(uniq))
    ph, cnt = uniq.view(np.int64).copy(), counts.copy()
    del h, uniq, counts
    before = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    lsh.near_pairs(ph.view(np.uint64), k, cap, cnt, tables=tables[0::2])
    return {"n": n, "growth": peak_bytes() - before, "seconds": round(time.perf_counter() - t0, 2),
            "input_bytes": int(ph.nbytes + cnt.nbytes)}


def section_search(args) -> None:
    print(f"== near-duplicate search (dedup.near_search), k={args.k}, max_bucket {args.cap}, "
          f"search_task_hashes {args.task_hashes:,}, 2 CPUs", flush=True)
    pts = []
    for n in args.hashes:
        with tempfile.TemporaryDirectory(prefix="vosr-mem-search-") as tmp:
            log = Path(tmp) / "task-peaks.jsonl"
            r = _child(["--_child", "search", "--n", str(n), "--k", str(args.k), "--cap", str(args.cap),
                        "--task-hashes", str(args.task_hashes), "--run", "0", "--log", str(log),
                        "--object-store-mib", str(args.object_store_mib)])
            peaks = [json.loads(x) for x in log.read_text().splitlines() if '"search"' in x]
        big = max(peaks, key=lambda p: p["growth"])
        med = float(np.median([p["growth"] for p in peaks]))
        pts.append((n, big["growth"]))
        print(f"  n={n:>11,} ({r['distinct']:,} distinct) {r['seconds']:7.1f} s  tasks {len(peaks)} "
              f"(groups {r['plan']['groups']}, per task: most {r['plan']['most_hashes']:,} hashes)  largest task "
              f"growth {_mib(big['growth'])} ({big['rows_in']:,} hashes in), median {_mib(med)}  planted found "
              f"{r['found']}/{r['planted']}  overflow {r['overflow']}", flush=True)
        if args.baseline:
            b = _child(["--_child", "search-baseline", "--n", str(n), "--k", str(args.k), "--cap", str(args.cap)])
            print(f"      previous design, one task (all {r['distinct']:,} hashes, half the tables): growth "
                  f"{_mib(b['growth'])} in {b['seconds']:.1f} s", flush=True)
    own = []
    for n in args.hashes:  # the fullest task of each size alone in a fresh process: no worker's earlier state
        t = _child(["--_child", "search-task", "--n", str(n), "--k", str(args.k), "--cap", str(args.cap),
                    "--task-hashes", str(args.task_hashes)])
        own.append(t["growth"])
        print(f"  n={n:>11,}: the first task alone in a fresh process ({t['hashes']:,} hashes, {t['tables']} "
              f"tables): growth {_mib(t['growth'])} = {t['growth'] / t['hashes']:.0f} B per hash", flush=True)
    print("  fresh-process task growth relative to the smallest size: " + ", ".join(
        f"{n:,}: x{g / own[0]:.2f}" for n, g in zip(args.hashes, own)) + f"  (target within 20%: "
        f"{'met' if all(abs(g / own[0] - 1) <= 0.2 for g in own) else 'NOT met'})")
    g0 = pts[0][1]
    print("  largest per-task growth in the Ray workers relative to the smallest size: " + ", ".join(
        f"{n:,}: x{g / g0:.2f}" for n, g in pts) + f"  (target within 20%: "
        f"{'met' if all(abs(g / g0 - 1) <= 0.2 for _, g in pts) else 'NOT met'})")
    if args.run:
        n = args.hashes[0]
        with tempfile.TemporaryDirectory(prefix="vosr-mem-run-") as tmp:
            log = Path(tmp) / "task-peaks.jsonl"
            r = _child(["--_child", "search", "--n", str(n), "--k", str(args.k), "--cap", str(args.cap),
                        "--task-hashes", str(args.task_hashes), "--run", str(args.run), "--log", str(log),
                        "--object-store-mib", str(args.object_store_mib)])
            peaks = [json.loads(x) for x in log.read_text().splitlines() if '"search"' in x]
        big = max(peaks, key=lambda p: p["growth"])
        print(f"  n={n:,} + a run of {args.run:,} near-copies of one hash: {r['seconds']:.1f} s, largest task growth "
              f"{_mib(big['growth'])} ({big['rows_in']:,} hashes in; x{big['growth'] / g0:.2f} the run-free "
              f"size), overflow {r['overflow']}, planted found {r['found']}/{r['planted']}", flush=True)


# ================================================================================================ k-means

def kmeans_child(n: int, k: int, dim: int, which: str, seed: int) -> dict:
    from jobkit.memprobe import peak_bytes, reset_peak, rss_bytes
    from pipelines.curation import balance

    x = synthetic_embeddings(n, dim, seed)
    before = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    if which == "new":
        c = balance.kmeans_fit(x, k, seed)
    else:
        from tests.helpers.kmeans_reference import kmeans_fit_reference

        c = kmeans_fit_reference(x, k, seed)
    secs = time.perf_counter() - t0
    peak = peak_bytes()
    return {"n": n, "k": k, "which": which, "seconds": round(secs, 2), "growth": peak - before, "peak": peak,
            "inertia": balance.inertia(x, c), "sample_bytes": int(x.nbytes)}


def kmeans_task_child(n: int, k: int, dim: int, log: str, object_store_mib: int) -> dict:
    """The shipped path: curate.fit_centres on a Ray Dataset of n unlabelled rows (sample_size n, k clusters):
    the sample chosen where the rows are, the fit in one Ray task; its peak from jobkit.memprobe."""
    import pyarrow as pa
    import ray
    import ray.data

    from jobkit.config import config_from_dict
    from jobkit.memprobe import ENV
    from jobkit.ray_env import start_local_ray
    from pipelines import curate
    from pipelines.curation import balance

    x = synthetic_embeddings(n, dim, 0)
    t = pa.table({"id": [f"{i:032x}" for i in range(n)], "unlabelled": np.ones(n, np.int8),
                  "embedding": pa.FixedSizeListArray.from_arrays(x.ravel(), dim).cast(pa.list_(pa.float32()))})
    start_local_ray({"PYTHONPATH": str(ROOT), ENV: log}, num_cpus=2, object_store_memory=object_store_mib * MiB,
                    log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        meta = ray.data.from_arrow(t).repartition(max(1, n // 65536)).materialize()
        del t
        ccfg = config_from_dict({"curate": {"balance": {"num_clusters": k, "sample_size": n}}}).curate
        t0 = time.perf_counter()
        centres, _ = curate.fit_centres(meta, ccfg, seed=0)
        secs = time.perf_counter() - t0
    finally:
        ray.shutdown()
    rec = [json.loads(line) for line in Path(log).read_text().splitlines() if '"kmeans"' in line][-1]
    return {"n": n, "k": k, "which": "task", "seconds": round(secs, 2), "growth": rec["growth"], "peak": rec["peak"],
            "task_seconds": rec["seconds"], "inertia": balance.inertia(x, centres), "sample_bytes": int(x.nbytes),
            "bound": balance.kmeans_peak_bytes(n, dim, k)}


def synthetic_embeddings(n: int, dim: int, seed: int) -> np.ndarray:
    """Clustered float32 vectors in [0, 1] like the cheap embedding (thumbnail colours): 512 blobs of varied
    spread, so k-means has structure to find at every k."""
    rng = np.random.default_rng(seed)
    centres = rng.random((512, dim), dtype=np.float32)
    spread = rng.uniform(0.02, 0.15, 512).astype(np.float32)
    lab = rng.integers(0, 512, n)
    x = centres[lab] + rng.standard_normal((n, dim), dtype=np.float32) * spread[lab, None]
    return np.clip(x, 0, 1)


def section_kmeans(args) -> None:
    print(f"== balance k-means, dim {args.kmeans_dim}, one process per fit (BLAS threads as the environment sets)",
          flush=True)
    new_pts = []
    for spec in args.kmeans_sizes:
        n, k = (int(v) for v in spec.split(":"))
        r = _child(["--_child", "kmeans", "--n", str(n), "--k", str(k), "--dim", str(args.kmeans_dim), "--which", "new"])
        new_pts.append(r)
        line = (f"  n={n:>9,} k={k:>5}  new: {r['seconds']:7.1f} s, peak {_mib(r['peak'])} (growth "
                f"{_mib(r['growth'])}, sample {_mib(r['sample_bytes'])}), inertia {r['inertia']:.6g}")
        if n * k <= args.reference_max:
            o = _child(["--_child", "kmeans", "--n", str(n), "--k", str(k), "--dim", str(args.kmeans_dim), "--which", "old"])
            line += (f"\n  {'':>18}  old: {o['seconds']:7.1f} s, peak {_mib(o['peak'])}, inertia {o['inertia']:.6g}"
                     f"  -> new/old inertia {r['inertia'] / o['inertia']:.4f}, time x{o['seconds'] / r['seconds']:.1f}")
        print(line, flush=True)
    fit = [(r["n"] * r["k"], r["seconds"]) for r in new_pts]
    if len(fit) >= 2:
        e = np.polyfit(np.log([a for a, _ in fit]), np.log([b for _, b in fit]), 1)[0]
        t_full = fit[-1][1] * (2**20 * 4096 / fit[-1][0]) ** e
        print(f"  growth exponent of the new fit's time in n x k: {e:.2f}; extrapolated 1,048,576 x 4,096: "
              f"{t_full:.0f} s (target < 600 s: {'met' if t_full < 600 else 'NOT met'})")
    if args.full:  # the shipped setting through the job's own path: fit_centres, the fit in one Ray task
        with tempfile.TemporaryDirectory(prefix="vosr-mem-km-") as tmp:
            log = Path(tmp) / "task-peaks.jsonl"
            r = _child(["--_child", "kmeans-task", "--n", str(2**20), "--k", "4096", "--dim", str(args.kmeans_dim),
                        "--log", str(log), "--object-store-mib", str(max(args.object_store_mib, 4000))])
        print(f"  n=1,048,576 k= 4096  curate.fit_centres (Ray, 2 CPUs): {r['seconds']:.0f} s (the task "
              f"{r['task_seconds']:.0f} s), k-means task peak growth {_mib(r['growth'])} (bound {_mib(r['bound'])}, "
              f"sample {_mib(r['sample_bytes'])}), inertia {r['inertia']:.6g}; targets < 2 GiB: "
              f"{'met' if r['growth'] < 2**31 else 'NOT met'}, < 600 s: {'met' if r['seconds'] < 600 else 'NOT met'}",
              flush=True)


# ================================================================================================ write

def write_ledger_child(ledger_mib: int, image_kib: int, tmp: str) -> dict:
    """One block's stage-1 ledger of about ledger_mib MiB, written by stage 1's own LedgerWriter (64 MiB row
    groups, rows in a shuffled order as a crawl completes them; 10% of the rows filtered out)."""
    import pyarrow.parquet as pq

    from pipelines.curation.stage1 import LedgerWriter, ledger_uri

    rng = np.random.default_rng(0)
    rows = max(8, ledger_mib * MiB // (image_kib * 1024))
    key = "ab" * 12
    out = str(Path(tmp) / "out")
    for k, n, kib in ((key, rows, image_kib), ("cd" * 12, 10, 1)):  # the block, and a tiny one for the warm-up
        sink = LedgerWriter(ledger_uri(out, k), "", 64 * MiB)
        for r in rng.permutation(n).tolist():  # random (incompressible) bytes per image, as encoded images are
            ok = r % 10 != 0
            sink.add({"unit": k, "row": r, "source": f"synthetic://{r}", "reason": "ok" if ok else "too_small",
                      "id": f"{r:032x}", "image": rng.bytes(kib * 1024) if ok else None,
                      "format": "jpeg", "width": 512, "height": 512, "sha256": f"{r:064x}", "phash": r, "dhash": r,
                      "gradient": 1.0, "entropy": 6.0, "embedding": [0.5] * 16, "sharpness": 1.0, "fidelity": 90.0,
                      "declared_type": "image/jpeg"})
        sink.commit()
    path = ledger_uri(out, key)
    return {"rows": rows, "key": key, "out": out, "file_bytes": os.path.getsize(path),
            "ledger_bytes": pq.read_table(path).nbytes}


def write_child(tmp: str) -> dict:
    import pyarrow as pa

    from jobkit.memprobe import peak_bytes, reset_peak, rss_bytes
    from pipelines.curation import writer

    info = json.loads((Path(tmp) / "ledger.json").read_text())
    key, out, rows = info["key"], info["out"], info["rows"]

    def decisions(key: str, rows: int) -> tuple[pa.Table, int]:
        ok_rows = [r for r in range(rows) if r % 10]
        n_ok = len(ok_rows)
        dup = set(ok_rows[: n_ok // 4])
        return pa.table({
            "unit": [key] * (n_ok + 1), "row": pa.array([-1] + ok_rows, pa.int32()),
            "kind": pa.array([writer.KIND_MARKER] + [writer.KIND_DECISION] * n_ok, pa.int8()),
            "id": [None] + [f"{r:032x}" for r in ok_rows], "category": [None] + ["c"] * n_ok,
            "category_source": [None] + ["list"] * n_ok,
            "duplicate_of": [None] + [f"{0:032x}" if r in dup else None for r in ok_rows],
            "drop_reason": [None] + ["duplicate" if r in dup else None for r in ok_rows],
            "ledger_gen": pa.array([0] + [None] * n_ok, pa.int32())}, schema=writer.DECISION_SCHEMA), n_ok - len(dup)

    writer.write_unit_shard(decisions("cd" * 12, 10)[0], out, "", "warm-up")  # imports: as in a reused worker
    group, want_kept = decisions(key, rows)
    before = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    res = writer.write_unit_shard(group, out, "", "fp")
    secs = time.perf_counter() - t0
    growth = peak_bytes() - before
    stats = json.loads(res["stats"][0].as_py())
    assert stats["kept"] == want_kept, stats
    page = 2**20 + info["file_bytes"] // rows  # streamable pages: ~1 MiB plus one image
    bound = writer.write_peak_bytes(info["file_bytes"], rows, page) if hasattr(writer, "write_peak_bytes") else None
    return {**info, "growth": growth, "seconds": round(secs, 2), "bound": bound}


def section_write(args) -> None:
    print(f"== write task (writer.write_unit_shard), images of {args.image_kib} KiB, ledger row groups of 64 MiB",
          flush=True)
    pts = []
    for mib in args.ledger_mib:
        with tempfile.TemporaryDirectory(prefix="vosr-mem-write-") as tmp:
            info = _child(["--_child", "write-ledger", "--ledger-mib", str(mib), "--image-kib", str(args.image_kib),
                           "--tmp", tmp])
            (Path(tmp) / "ledger.json").write_text(json.dumps(info))
            r = _child(["--_child", "write", "--tmp", tmp])
        ratio = r["growth"] / r["file_bytes"]
        pts.append(ratio)
        b = f", stated bound {_mib(r['bound'])}" if r["bound"] else ""
        print(f"  ledger {r['rows']:6d} rows, file {_mib(r['file_bytes'])} (in memory {_mib(r['ledger_bytes'])}):"
              f" peak growth {_mib(r['growth'])} = {ratio:.2f} x the ledger file{b}; {r['seconds']:.1f} s",
              flush=True)
    print(f"  largest ratio {max(pts):.2f} (target < 1.5: {'met' if max(pts) < 1.5 else 'NOT met'})")


# ================================================================================================ main

SECTIONS = {"stage2": section_stage2, "search": section_search, "kmeans": section_kmeans, "write": section_write}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", nargs="+", choices=sorted(SECTIONS), default=None,
                    help="which stages to measure (default: all)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 2_000_000, 4_000_000],
                    help="stage2: corpus rows (stage-1 ledger rows)")
    ap.add_argument("--rows-per-block", type=int, default=16_384, help="stage2: rows per stage-1 ledger")
    ap.add_argument("--dim", type=int, default=16, help="stage2: embedding floats")
    ap.add_argument("--local-max-edges", type=int, default=500_000, help="stage2: curate.dedup.local_max_edges")
    ap.add_argument("--object-store-mib", type=int, default=3000)
    ap.add_argument("--hashes", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000],
                    help="search: corpus hashes")
    ap.add_argument("--task-hashes", type=int, default=1_000_000, help="search: curate.dedup.search_task_hashes")
    ap.add_argument("--k", type=int, default=6, help="search: Hamming radius")
    ap.add_argument("--cap", type=int, default=1000, help="search: curate.dedup.max_bucket")
    ap.add_argument("--run", type=int, default=100_000, help="search: near-copies in the planted run (0: none)")
    ap.add_argument("--baseline", action="store_true", help="search: also the previous design's task")
    ap.add_argument("--kmeans-dim", type=int, default=196, help="kmeans: vector size (the cheap embedding's)")
    ap.add_argument("--kmeans-sizes", nargs="+", default=["65536:512", "131072:1024", "262144:2048"],
                    help="kmeans: samples:clusters")
    ap.add_argument("--reference-max", type=int, default=2**27,
                    help="kmeans: run the previous fit up to this samples x clusters")
    ap.add_argument("--full", action="store_true", help="kmeans: also 1,048,576 x 4,096")
    ap.add_argument("--ledger-mib", type=int, nargs="+", default=[64, 256, 1024], help="write: ledger sizes")
    ap.add_argument("--image-kib", type=int, default=256, help="write: bytes per image")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    ap.add_argument("--which", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child == "ledgers":
        tmp = Path(a.tmp)
        keys = write_stage1_ledgers(a.n, tmp / "out", a.rows_per_block, a.dim)
        (tmp / "keys.json").write_text(json.dumps(keys))
        warm = write_stage1_ledgers(4000, tmp / "warm", 1000, a.dim, seed=1)
        (tmp / "warm_keys.json").write_text(json.dumps(warm))
        print(json.dumps({"blocks": len(keys)}))
        return 0
    if a._child == "stage2":
        print(json.dumps(stage2_child(a.n, a.tmp, a.rows_per_block, a.dim, a.object_store_mib, a.local_max_edges,
                                      a.log)))
        return 0
    if a._child == "search":
        print(json.dumps(search_child(a.n, a.k, a.cap, a.task_hashes, a.run, a.log, a.object_store_mib)))
        return 0
    if a._child == "search-task":
        print(json.dumps(search_task_child(a.n, a.k, a.cap, a.task_hashes)))
        return 0
    if a._child == "search-baseline":
        print(json.dumps(search_baseline_child(a.n, a.k, a.cap)))
        return 0
    if a._child == "kmeans-task":
        print(json.dumps(kmeans_task_child(a.n, a.k, a.dim, a.log, a.object_store_mib)))
        return 0
    if a._child == "kmeans":
        print(json.dumps(kmeans_child(a.n, a.k, a.dim, a.which, a.seed)))
        return 0
    if a._child == "write-ledger":
        print(json.dumps(write_ledger_child(a.ledger_mib[0], a.image_kib, a.tmp)))
        return 0
    if a._child == "write":
        print(json.dumps(write_child(a.tmp)))
        return 0
    for name in a.section or list(SECTIONS):
        SECTIONS[name](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
