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


def _rest_bits(u: np.ndarray, band: int, k: int) -> tuple[np.ndarray, int]:
    """The hash bits outside `band`, packed into the low (64 - width) bits."""
    shift, width = band_spec(k)[band]
    low = u & np.uint64((1 << shift) - 1)
    high = (u >> np.uint64(shift + width)) << np.uint64(shift) if shift + width < 64 else np.zeros_like(u)
    return low | high, 64 - width


def _equal_runs(keys: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Index pairs (into keys) of equal keys, comparing each element with the next cap-1 equal ones.

    Returns (i, j, overflow) with overflow = number of elements in runs longer than cap."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    out_i, out_j = [], []
    n = len(sk)
    d = 1
    while d < min(n, cap):
        eq = np.flatnonzero(sk[d:] == sk[:-d])
        if eq.size == 0:
            break
        out_i.append(order[eq])
        out_j.append(order[eq + d])
        d += 1
    overflow = 0
    if n >= cap and d >= cap:  # some run reached the cap: count its members
        starts = np.flatnonzero(np.concatenate([[True], sk[1:] != sk[:-1]]))
        sizes = np.diff(np.concatenate([starts, [n]]))
        overflow = int(sizes[sizes > cap].sum())
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), overflow
    return np.concatenate(out_i), np.concatenate(out_j), overflow


def band_bucket_pairs(hashes, k: int, band: int, cap: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Verified pairs (i < j, Hamming <= k) among hashes that share LSH band `band`.

    Second pigeonhole level: the other 64 - width bits of a pair within distance k differ in at most k bits,
    so at least one of k+1 sub-bands of those bits is equal too; candidates are pairs with an equal sub-band
    (found by sorting, no all-pairs matrix), verified exactly. Work grows with the candidates, not n^2."""
    u = as_u64(hashes)
    n = len(u)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    rest, bits = _rest_bits(u, band, k)
    if bits < k + 1:  # too few bits left to split: compare all pairs (in chunks of cap)
        return bucket_pairs(hashes, k, cap)
    base, extra = divmod(bits, k + 1)
    cand_i, cand_j, overflow, shift = [], [], 0, 0
    for s in range(k + 1):
        w = base + (1 if s < extra else 0)
        sub = (rest >> np.uint64(shift)) & np.uint64((1 << w) - 1)
        shift += w
        i, j, ov = _equal_runs(sub, cap)
        cand_i.append(i)
        cand_j.append(j)
        overflow = max(overflow, ov)
    i = np.concatenate(cand_i)
    j = np.concatenate(cand_j)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    ok = popcount(u[lo] ^ u[hi]) <= k
    pair = np.unique(lo[ok].astype(np.int64) * n + hi[ok])
    return pair // n, pair % n, overflow


def lsh_pairs_local(hashes, k: int, cap: int = 1 << 30) -> set[tuple[int, int]]:
    """All index pairs within distance k by two-level banded LSH on one machine (numpy, sort-based)."""
    h = np.asarray(hashes, dtype=np.int64)
    u = as_u64(h)
    n = len(u)
    found = []
    for band, (shift, width) in enumerate(band_spec(k)):
        bval = (u >> np.uint64(shift)) & (np.uint64((1 << width) - 1) if width < 64
                                         else np.uint64(0xFFFFFFFFFFFFFFFF))
        rest, bits = _rest_bits(u, band, k)
        if bits < k + 1:  # too few bits left for a second level: every pair sharing the band is a candidate
            i, j, _ = _equal_runs(bval, cap)
            lo, hi = np.minimum(i, j), np.maximum(i, j)
            ok = popcount(u[lo] ^ u[hi]) <= k
            found.append(lo[ok].astype(np.int64) * n + hi[ok])
            continue
        base, extra = divmod(bits, k + 1)
        shift2 = 0
        for s in range(k + 1):
            w = base + (1 if s < extra else 0)
            sub = (rest >> np.uint64(shift2)) & np.uint64((1 << w) - 1)
            shift2 += w
            key = (bval << np.uint64(w)) | sub if width + w < 64 else bval ^ (sub * np.uint64(0x9E3779B97F4A7C15))
            i, j, _ = _equal_runs(key, cap)
            lo, hi = np.minimum(i, j), np.maximum(i, j)
            ok = popcount(u[lo] ^ u[hi]) <= k
            found.append(lo[ok].astype(np.int64) * n + hi[ok])
    pairs = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    return set(zip((pairs // n).tolist(), (pairs % n).tolist()))


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
