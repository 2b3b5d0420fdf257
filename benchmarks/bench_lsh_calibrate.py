"""Calibrate lsh.CANDIDATE_COST: the time of one candidate pair against one sort step, fitted by least squares
over a few k = 8 designs (60 tables each) on uniform random 64-bit hashes.

    flock /tmp/vosr-heavy.lock .venv/bin/python benchmarks/bench_lsh_calibrate.py [--n 1048576] [--tables 60]

Prints per design its tables, key bits, candidates per value per table (expected n / 2^(bits+1)), seconds and ns
per value per table, then the fitted ns per sort step, ns per candidate and their ratio (CANDIDATE_COST is 4.0;
docs/scale.md s2 reports a run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.curation import lsh  # noqa: E402

DESIGNS = [(17, 6), (16, 6), (17, 5), (15, 6), (16, 5)]  # (m blocks, r per key) for k = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 20)
    ap.add_argument("--tables", type=int, default=60)
    args = ap.parse_args()
    u = np.unique(np.random.default_rng(0).integers(0, 2**64, args.n, dtype=np.uint64))
    n = len(u)
    rows = []
    for m, r in DESIGNS:
        tabs = lsh.plan_tables(8, n, r=r, m=m)[:args.tables]
        bits = [sum(w for _, w in t) for t in tabs]
        cand = sum(n * n / 2 ** (b + 1) for b in bits)
        t0 = time.perf_counter()
        lsh.near_pairs(u, 8, 1000, tables=tabs)
        dt = time.perf_counter() - t0
        rows.append((len(tabs) * n, cand, dt))
        print(f"m={m} r={r}: {len(tabs)} tables, key bits {min(bits)}-{max(bits)}, candidates per value per table "
              f"{cand / n / len(tabs):.3f}, {dt:.2f} s = {dt / len(tabs) / n * 1e9:.1f} ns per value per table",
              flush=True)
    a = np.array([[x, y] for x, y, _ in rows])
    coef, *_ = np.linalg.lstsq(a, np.array([t for *_, t in rows]), rcond=None)
    print(f"fit: {coef[0] * 1e9:.1f} ns per sort step, {coef[1] * 1e9:.1f} ns per candidate, "
          f"ratio {coef[1] / coef[0]:.2f} (lsh.CANDIDATE_COST = {lsh.CANDIDATE_COST})")


if __name__ == "__main__":
    main()
