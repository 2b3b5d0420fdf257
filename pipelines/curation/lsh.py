"""Banded LSH for 64-bit hashes under Hamming distance (pure numpy; the Ray group-by lives in dedup.py).

Pigeonhole: split the 64 bits into k+1 disjoint bands. Two hashes within Hamming distance k differ in at most k
bits, so at least one band is identical: grouping by (band index, band value) finds every such pair; candidates
are then verified exactly. Buckets larger than a cap (flat images sharing one hash) are compared only inside
chunks of the cap after sorting by hash, and counted as overflow.
"""

from __future__ import annotations

import numpy as np


def band_spec(k: int) -> list[tuple[int, int]]:
    """(shift, width) of the k+1 bands covering 64 bits (widths differ by at most one)."""
    n = k + 1
    if not 1 <= n <= 64:
        raise ValueError(f"hamming radius k={k} must be in 0..63")
    base, extra = divmod(64, n)
    out, shift = [], 0
    for i in range(n):
        w = base + (1 if i < extra else 0)
        out.append((shift, w))
        shift += w
    return out


def as_u64(h) -> np.ndarray:
    return np.asarray(h, dtype=np.int64).view(np.uint64)


def band_values(hashes, k: int) -> np.ndarray:
    """[n, k+1] band values (as int64) of signed-int64 hashes."""
    u = as_u64(hashes)
    cols = []
    for shift, width in band_spec(k):
        mask = np.uint64((1 << width) - 1) if width < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
        cols.append(((u >> np.uint64(shift)) & mask).view(np.int64))
    return np.stack(cols, axis=1) if cols else np.zeros((len(u), 0), np.int64)


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x).astype(np.int64)


def pairs_within(hashes, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of one small group whose Hamming distance is <= k (exact, vectorised)."""
    u = as_u64(hashes)
    n = len(u)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d = popcount(u[:, None] ^ u[None, :])
    i, j = np.nonzero(np.triu(d <= k, 1))
    return i.astype(np.int64), j.astype(np.int64)


def bucket_pairs(hashes, k: int, cap: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Verified pairs of one LSH bucket; a bucket over `cap` is split (sorted by hash) into chunks of `cap`.

    Returns (i, j, overflow) where overflow is the bucket size when it was split, else 0.
    """
    u = as_u64(hashes)
    n = len(u)
    if n <= cap:
        i, j = pairs_within(u.view(np.int64), k)
        return i, j, 0
    order = np.argsort(u, kind="stable")
    out_i, out_j = [], []
    for s in range(0, n, cap):
        idx = order[s:s + cap]
        i, j = pairs_within(u[idx].view(np.int64), k)
        out_i.append(idx[i])
        out_j.append(idx[j])
    return np.concatenate(out_i), np.concatenate(out_j), n


def lsh_pairs_local(hashes, k: int, cap: int = 1 << 30) -> set[tuple[int, int]]:
    """All index pairs within distance k, by banded LSH on one machine (numpy sort-based grouping)."""
    h = np.asarray(hashes, dtype=np.int64)
    bands = band_values(h, k)
    found: set[tuple[int, int]] = set()
    for b in range(bands.shape[1]):
        vals = bands[:, b]
        order = np.argsort(vals, kind="stable")
        sv = vals[order]
        bounds = np.flatnonzero(np.diff(sv)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(sv)]])
        for s, e in zip(starts[(ends - starts) > 1], ends[(ends - starts) > 1]):
            idx = order[s:e]
            i, j, _ = bucket_pairs(h[idx], k, cap)
            a, c = idx[i], idx[j]
            lo, hi = np.minimum(a, c), np.maximum(a, c)
            found.update(zip(lo.tolist(), hi.tolist()))
    return found


def brute_force_pairs(hashes, k: int, chunk: int = 2048) -> set[tuple[int, int]]:
    """All index pairs within distance k by exhaustive comparison (vectorised popcount in chunks)."""
    u = as_u64(hashes)
    n = len(u)
    found: set[tuple[int, int]] = set()
    for s in range(0, n, chunk):
        block = u[s:s + chunk]
        d = popcount(block[:, None] ^ u[None, :])
        i, j = np.nonzero(d <= k)
        i = i + s
        keep = i < j
        found.update(zip(i[keep].tolist(), j[keep].tolist()))
    return found
