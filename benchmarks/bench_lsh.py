"""Near-duplicate search on synthetic 64-bit hashes: banded LSH (pigeonhole, k+1 bands) vs brute force.

    .venv/bin/python benchmarks/bench_lsh.py [--n 200000] [--k 6] [--pairs 2000]

Brute force compares every pair with a vectorised numpy popcount in row chunks (upper triangle only). Both must
find the same pair set (planted near pairs plus any random ones); prints timings and the speed-up (target >= 50x).
CPU only; the banded LSH here is the single-process form of the group-by the curate job runs on Ray Data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.curation.lsh import as_u64, lsh_pairs_local, popcount  # noqa: E402


def synthetic(n: int, pairs: int, k: int, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    h = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    src = rng.choice(n, size=pairs, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), size=pairs, replace=False)
    planted = set()
    for i, (a, b) in enumerate(zip(src, dst)):
        flips = rng.choice(64, size=1 + i % k, replace=False)  # distances 1..k
        mask = np.uint64(sum(1 << int(x) for x in flips))
        h[b] = (h[a].view(np.uint64) ^ mask).view(np.int64)
        planted.add((int(min(a, b)), int(max(a, b))))
    return h, planted


def brute_force_upper(h: np.ndarray, k: int, chunk: int = 128) -> set[tuple[int, int]]:
    u = as_u64(h)
    n = len(u)
    found: set[tuple[int, int]] = set()
    for s in range(0, n, chunk):
        block = u[s:s + chunk]
        rest = u[s:]
        d = popcount(block[:, None] ^ rest[None, :])
        i, j = np.nonzero(d <= k)
        i, j = i + s, j + s
        keep = i < j
        found.update(zip(i[keep].tolist(), j[keep].tolist()))
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=2000)
    args = ap.parse_args()
    h, planted = synthetic(args.n, args.pairs, args.k)
    t0 = time.perf_counter()
    got = lsh_pairs_local(h, args.k)
    t_lsh = time.perf_counter() - t0
    t0 = time.perf_counter()
    brute = brute_force_upper(h, args.k)
    t_brute = time.perf_counter() - t0
    same = got == brute
    print(f"n={args.n} k={args.k} planted={len(planted)} bands={args.k + 1}")
    print(f"banded LSH : {t_lsh:8.2f} s  pairs={len(got)}  planted found={len(planted & got)}/{len(planted)}")
    print(f"brute force: {t_brute:8.2f} s  pairs={len(brute)}")
    print(f"same pairs : {same}")
    print(f"speed-up   : {t_brute / t_lsh:.1f}x (target >= 50x)")
    return 0 if same and planted <= got else 1


if __name__ == "__main__":
    raise SystemExit(main())
