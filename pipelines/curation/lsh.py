"""Exact near-duplicate search for 64-bit hashes under Hamming distance (pure numpy; Ray form in dedup.py).

Identical hashes first: one sort groups them, every group is one node (its members link to the group's first row
by star edges, never all pairs), so many flat images sharing one hash cost one sort, not n^2.

Near pairs among the distinct values use multi-index hashing with combined blocks (pigeonhole): split the 64
bits into m = k + r blocks; two hashes within distance k differ in at most k blocks, so at least r blocks are
equal, and therefore some r-subset of the m blocks is equal. One table per r-subset (C(m, r) tables) keys every
value by those r blocks (about 64 r / m bits); values sharing a key are candidates, verified by an exact popcount
distance. Every pair within k shares at least one table key: recall is exact. r is chosen from the corpus size
(`plan_tables`): longer keys (larger r) keep the expected random occupancy of a key bounded as the corpus grows,
at the price of more tables, so the work stays about (tables x n) sort steps plus a bounded number of candidates
per value. A table is one sort of packed (key, index) words; the pairs come from runs of equal keys, vectorised.

Skew (a cluster of many near-copies shares keys in most tables): inside a run of equal keys each value is
compared with the next `cap` - 1 values of the run (by hash order); a run holding more than `cap` rows is
counted as overflow (buckets, rows) and reported, so bounded work never drops recall silently.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import combinations
from math import comb

import numpy as np

# relative cost of one candidate pair (gather + popcount + pair generation) vs one sort step per value;
# measured roughly with benchmarks/bench_scale.py on the 2-core dev machine
CANDIDATE_COST = 4.0
MAX_TABLES = 5000
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it is a bijection on 64-bit words


def as_u64(h) -> np.ndarray:
    return np.asarray(h, dtype=np.int64).view(np.uint64)


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x).astype(np.int64)


def block_spec(m: int) -> list[tuple[int, int]]:
    """(shift, width) of m blocks covering the 64 bits (widths differ by at most one)."""
    if not 1 <= m <= 64:
        raise ValueError(f"number of blocks m={m} must be in 1..64")
    base, extra = divmod(64, m)
    out, shift = [], 0
    for i in range(m):
        w = base + (1 if i < extra else 0)
        out.append((shift, w))
        shift += w
    return out


def _subsets(m: int, size: int) -> np.ndarray:
    """Every `size`-subset of m blocks as a bit mask (int64), vectorised."""
    cur, last = np.zeros(1, np.int64), np.full(1, -1)
    for _ in range(size):
        parts, lasts = [], []
        for b in range(m):
            sel = last < b
            parts.append(cur[sel] | (1 << b))
            lasts.append(np.full(int(sel.sum()), b))
        cur, last = np.concatenate(parts), np.concatenate(lasts)
    return cur


@lru_cache(maxsize=256)
def block_design(k: int, m: int, r: int) -> tuple[int, ...]:
    """Sets of r blocks (bit masks over m blocks) such that whichever k blocks hold the differences, one set
    avoids them all: a pair within distance k then shares that set's key. m = k + r needs every r-set; for
    larger m a greedy cover (Turan-type) needs far fewer. Built deterministically and checked exhaustively
    against every k-set of blocks, so recall stays exact by construction."""
    if m == k + r:
        return tuple(sum(1 << b for b in c) for c in combinations(range(m), r))
    dirty = _subsets(m, k)
    fam: list[int] = []
    rng = np.random.default_rng(0)
    left = dirty
    while len(left):
        f, sub = 0, left
        for _ in range(r):  # add the block that keeps the most uncovered k-sets avoidable
            best, best_n = -1, -1
            for b in rng.permutation(m):
                if f >> int(b) & 1:
                    continue
                c = int(np.count_nonzero((sub & (1 << int(b))) == 0))
                if c > best_n:
                    best, best_n = int(b), c
            f |= 1 << best
            sub = sub[(sub & (1 << best)) == 0]
        fam.append(f)
        left = left[(left & f) != 0]
    covered = np.zeros(len(dirty), bool)
    for f in fam:
        covered |= (dirty & f) == 0
    if not covered.all():  # cannot happen by construction; recall must never depend on luck
        raise AssertionError(f"block design k={k} m={m} r={r} misses a set")
    return tuple(fam)


def _designs(k: int, n: int):
    """Candidate (m, r) designs for radius k: every r-of-(k+r), plus (for n >= 2^16, where they pay for the
    time to build them) greedy covers on up to 17 blocks."""
    for r in range(1, 64 - k + 1):
        if comb(k + r, r) > MAX_TABLES and r > 1:
            break
        yield k + r, r
        for m in range(k + r + 1, 18 if n >= 1 << 16 else 0):
            bits = 64 * r / m  # only keys near log2(n) bits: shorter ones crowd, longer ones need more tables
            if comb(m, k) <= 25_000 and math.log2(n) - 2 <= bits <= math.log2(n) + 5:
                yield m, r


def table_cost(k: int, m: int, r: int, n: int) -> float:
    """Estimated work of design (m, r) on n distinct values: sort steps plus weighted candidates per table."""
    widths = [w for _, w in block_spec(m)]
    cost = 0.0
    for f in block_design(k, m, r):
        bits = sum(w for b, w in enumerate(widths) if f >> b & 1)
        cost += n + CANDIDATE_COST * n * n / 2.0 ** (bits + 1)
    return cost


@lru_cache(maxsize=64)
def choose_design(k: int, n: int) -> tuple[int, int]:
    """The (m blocks, r per key) with the least estimated work for n distinct values; keys grow with log n."""
    best, best_cost = (k + 1, 1), None
    for m, r in _designs(k, n):
        if len(block_design(k, m, r)) > MAX_TABLES:
            continue
        c = table_cost(k, m, r, n)
        if best_cost is None or c < best_cost:
            best, best_cost = (m, r), c
    return best


@lru_cache(maxsize=64)
def plan_tables(k: int, n: int, r: int | None = None, m: int | None = None):
    """The tables for radius k on n distinct values: each a tuple of (shift, width) blocks forming its key.

    Empty for k = 0 (identical hashes are grouped before any table)."""
    if not 0 <= k <= 63:
        raise ValueError(f"hamming radius k={k} must be in 0..63")
    if k == 0:
        return ()
    if r is None:
        m, r = choose_design(k, n)
    elif m is None:
        m = k + int(r)
    blocks = block_spec(m)
    return tuple(tuple(blocks[b] for b in range(m) if f >> b & 1) for f in block_design(k, m, int(r)))


def table_mask(blocks) -> np.uint64:
    """The bits of a table's key as one 64-bit mask."""
    mask = 0
    for shift, width in blocks:
        mask |= ((1 << width) - 1) << shift
    return np.uint64(mask)


def _run_pairs(sorted_keys: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positions (left, right) in a sorted array whose keys are equal, each with its next cap - 1 equals; and the
    start and size of every run of two or more (for the overflow count). Work grows with the output, not n^2:
    after one O(n) comparison of neighbours, each further distance d only looks at the pairs still equal."""
    eq = sorted_keys[1:] == sorted_keys[:-1]  # eq[p]: positions p and p + 1 share the key
    cur = np.flatnonzero(eq)
    if not len(cur):
        e = np.zeros(0, np.int64)
        return e, e, e, e
    lefts, rights = [cur], [cur + 1]
    last = len(eq) - 1
    d = 2
    while d < cap:
        nxt = cur + (d - 1)
        ok = nxt <= last
        cur = cur[ok]
        cur = cur[eq[nxt[ok]]]
        if not len(cur):
            break
        lefts.append(cur)
        rights.append(cur + d)
        d += 1
    pos = lefts[0]
    is_start = np.ones(len(pos), bool)
    is_start[1:] = pos[1:] != pos[:-1] + 1  # a new run unless the previous equal-pair is the neighbour
    starts = pos[is_start]
    n_pairs_adjacent = np.diff(np.concatenate([np.flatnonzero(is_start), [len(pos)]]))
    return np.concatenate(lefts), np.concatenate(rights), starts, n_pairs_adjacent + 1


def table_pairs(u: np.ndarray, blocks, k: int, cap: int, counts: np.ndarray | None = None):
    """Verified pairs (i < j, 0 < distance <= k) of distinct uint64 values `u` sharing the key of one table.

    `counts` (rows per distinct value) weighs the overflow count: a run of two or more distinct values holding
    more than `cap` rows counts as one overflowing bucket. Returns (i, j, overflow_buckets, overflow_rows)."""
    n = len(u)
    if n < 2:
        e = np.zeros(0, np.int64)
        return e, e, 0, 0
    idx_bits = max(1, (n - 1).bit_length())
    # key: the table's bits of each value, mixed by an odd multiplier (a bijection) and cut to the bits left
    # beside the index; equal keys stay equal, the rare extra collisions are removed by the exact check
    key = ((u & table_mask(blocks)) * _MIX) >> np.uint64(idx_bits)
    packed = np.sort((key << np.uint64(idx_bits)) | np.arange(n, dtype=np.uint64))
    left, right, st, sz = _run_pairs(packed >> np.uint64(idx_bits), cap)
    mask = np.uint64((1 << idx_bits) - 1)
    i = (packed[left] & mask).astype(np.int64)  # within a run the index (= hash order) ascends, so i < j
    j = (packed[right] & mask).astype(np.int64)
    ok = popcount(u[i] ^ u[j]) <= k
    over_b = over_r = 0
    if len(st):
        if counts is None:
            rows = sz
        else:
            members = np.repeat(st, sz) + (np.arange(int(sz.sum())) - np.repeat(np.cumsum(sz) - sz, sz))
            w = counts[(packed[members] & mask).astype(np.int64)]
            rows = np.add.reduceat(w, np.cumsum(sz) - sz)
        over = rows > cap
        over_b, over_r = int(over.sum()), int(rows[over].sum())
    return i[ok], j[ok], over_b, over_r


def split_groups(tables, n: int, part_size: int):
    """Group the tables by d key blocks they all contain, d chosen so that splitting the values by those blocks
    leaves parts of about `part_size` values (equal keys imply equal split blocks: the parts are independent,
    and each part's sort stays in cache). Returns [(split blocks, [tables])]."""
    if n <= part_size or not tables:
        return [((), list(tables))]
    widths = sorted(w for _, w in tables[0])
    d, bits = 0, 0
    while n / 2.0 ** bits > part_size and d < len(widths):
        bits += widths[d]
        d += 1
    left = list(tables)
    out = []
    while left:  # greedy: the d-set of blocks contained in the most remaining tables
        counts: dict = {}
        for t in left:
            for c in combinations(sorted(t), d):
                counts[c] = counts.get(c, 0) + 1
        best = max(counts, key=lambda c: (counts[c], c))
        group = [t for t in left if set(best) <= set(t)]
        left = [t for t in left if not set(best) <= set(t)]
        out.append((best, group))
    return out


def block_value(u: np.ndarray, blocks) -> np.ndarray:
    """The bits of the given key blocks of each value, concatenated (int64): equal keys of any table containing
    these blocks imply equal block values."""
    part = np.zeros(len(u), np.int64)
    for shift, width in blocks:
        part = (part << width) | ((u >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
    return part


def split_spans(u: np.ndarray, split) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The values' order by their split-block value (stable, so ascending indices stay ascending within a part)
    and the [start, end) span of each part in that order."""
    part = block_value(u, split)
    if len(part) and part.max() < (1 << 16) - 2:
        part = part.astype(np.uint16)  # a radix sort
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(int(part.max()) + 2))
    return order, [(int(bounds[p]), int(bounds[p + 1])) for p in range(len(bounds) - 1)]


def near_pairs(u: np.ndarray, k: int, cap: int, counts: np.ndarray | None = None, tables=None,
               n_plan: int | None = None, part_size: int = 1 << 16):
    """All pairs (i < j) of distinct values u within distance k (exact), over all tables (or the given ones).

    Returns (i, j, overflow) with overflow = {"buckets": .., "rows": ..} summed over the tables."""
    u = np.asarray(u, dtype=np.uint64)
    n = len(u)
    if tables is None:
        tables = plan_tables(k, n if n_plan is None else n_plan)
    found = []
    ob = orow = 0
    for split, group in split_groups(tables, n, part_size):
        if split:
            order, spans = split_spans(u, split)
            uo = u[order]
            co = counts[order] if counts is not None else None
        else:
            order, uo, co, spans = None, u, counts, [(0, n)]
        for blocks in group:
            for s, e in spans:
                if e - s < 2:
                    continue
                i, j, b, r = table_pairs(uo[s:e], blocks, k, cap, None if co is None else co[s:e])
                if order is not None:  # stable order: ascending indices stay ascending
                    i, j = order[s + i], order[s + j]
                found.append(i * n + j)
                ob += b
                orow += r
    pairs = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    return pairs // max(n, 1), pairs % max(n, 1), {"buckets": ob, "rows": orow}


# ---------------------------------------------------------------- spanning forest instead of pair lists

def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Roots of the indices x in the forest `parent` (pointer jumping, vectorised); compresses x's paths."""
    r = parent[x]
    while True:
        rr = parent[r]
        if np.array_equal(rr, r):
            break
        r = rr
    parent[x] = r
    return r


def union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the sets of each pair (a[i], b[i]) in the forest `parent` (every root is its set's smallest index):
    hook the larger root under the smaller, repeated for the pairs whose hooks collided."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    while len(a):
        ra, rb = _find(parent, a), _find(parent, b)
        ne = ra != rb
        if not ne.any():
            return
        lo, hi = np.minimum(ra[ne], rb[ne]), np.maximum(ra[ne], rb[ne])
        np.minimum.at(parent, hi, lo)
        a, b = lo, hi


def forest_edges(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(member, root) for every index that is not its set's root: a forest with the sets as components."""
    roots = _find(parent, np.arange(len(parent)))
    member = np.flatnonzero(roots != np.arange(len(parent)))
    return member, roots[member]


def _settled(cur: np.ndarray, label: np.ndarray, run_start: np.ndarray, run_size: np.ndarray,
             gid: np.ndarray, li: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """Mask over the active positions `cur`: True where every member of the position's run of equal keys is
    already in one set (no later comparison inside that run can join anything)."""
    runs = np.unique(label[cur])
    size = run_size[runs]
    start = run_start[runs]
    offs = np.cumsum(size) - size
    pos = np.repeat(start - offs, size) + np.arange(int(size.sum()))
    roots = _find(parent, gid[li[pos]])
    one = np.minimum.reduceat(roots, offs) == np.maximum.reduceat(roots, offs)
    done = np.zeros(len(run_size), bool)
    done[runs[one]] = True
    return done[label[cur]]


def table_union(u: np.ndarray, blocks, k: int, cap: int, parent: np.ndarray, gid: np.ndarray,
                counts: np.ndarray | None = None) -> tuple[int, int, int]:
    """One table over the distinct values u (global indices gid): join in `parent` every pair within distance k
    that shares the table's key, comparing each value with the next cap - 1 values of its run (hash order), one
    distance step at a time. Memory O(len(u)) whatever the runs: candidates are verified and merged per step,
    and a run whose members are all joined already is dropped. Returns (overflow buckets, overflow rows,
    verified pairs), overflow counted as in table_pairs."""
    n = len(u)
    if n < 2:
        return 0, 0, 0
    idx_bits = max(1, (n - 1).bit_length())
    packed = u & table_mask(blocks)
    packed *= _MIX
    packed >>= np.uint64(idx_bits)
    packed <<= np.uint64(idx_bits)
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    li = (packed & np.uint64((1 << idx_bits) - 1)).astype(np.int64)  # value index at each sorted position
    packed >>= np.uint64(idx_bits)
    eq = packed[1:] == packed[:-1]  # positions p and p + 1 share the key
    del packed
    cur = np.flatnonzero(eq)
    if not len(cur):
        return 0, 0, 0
    # runs of equal keys (two or more members): start position and size
    is_start = np.ones(len(cur), bool)
    is_start[1:] = cur[1:] != cur[:-1] + 1
    run_start = cur[is_start]
    run_size = np.diff(np.concatenate([np.flatnonzero(is_start), [len(cur)]])) + 1
    del is_start
    if counts is None:
        rows = run_size
    else:
        members = np.repeat(run_start, run_size) + (np.arange(int(run_size.sum()))
                                                    - np.repeat(np.cumsum(run_size) - run_size, run_size))
        rows = np.add.reduceat(counts[li[members]], np.cumsum(run_size) - run_size)
        del members
    over = rows > cap
    over_b, over_r = int(over.sum()), int(rows[over].sum())
    label = None  # run number of each sorted position, made the first time a settled check needs it
    verified = 0
    last = len(eq) - 1
    d = 1
    while len(cur) and d < cap:
        a, b = li[cur], li[cur + d]
        ok = popcount(u[a] ^ u[b]) <= k
        if ok.any():
            verified += int(ok.sum())
            union(parent, gid[a[ok]], gid[b[ok]])
        d += 1
        nxt = cur + (d - 1)
        keep = nxt <= last
        cur = cur[keep]
        cur = cur[eq[nxt[keep]]]
        if len(cur) >= 64 and d & (d - 1) == 0 and d >= 4:  # at d = 4, 8, 16, ...
            if label is None:
                label = np.zeros(n, np.int64)
                label[run_start] = 1
                label = np.cumsum(label) - 1
            cur = cur[~_settled(cur, label, run_start, run_size, gid, li, parent)]
    return over_b, over_r, verified


def near_forest(u: np.ndarray, k: int, cap: int, counts: np.ndarray | None = None, tables=None,
                part_size: int = 1 << 16):
    """The near-duplicate relation of near_pairs as a spanning forest: edges (i, j) whose connected components
    are exactly those of all the pairs (i, j) within distance k sharing a key of one of `tables` (under the same
    max_bucket cut), at most len(u) - 1 of them, in memory O(len(u)) whatever the skew. Dedup needs only those
    components; the pair list itself can be quadratic in a run of near-copies.

    Returns (i, j, info) with info = {"buckets", "rows"} (the overflow, as near_pairs) and "pairs" (verified
    pairs merged, counted with repeats across tables)."""
    u = np.asarray(u, dtype=np.uint64)
    n = len(u)
    if tables is None:
        tables = plan_tables(k, n)
    parent = np.arange(n, dtype=np.int64)
    ob = orow = nv = 0
    for split, group in split_groups(tables, n, part_size):
        if split:
            order, spans = split_spans(u, split)
            uo = u[order]
            co = counts[order] if counts is not None else None
        else:
            order, uo, co, spans = np.arange(n), u, counts, [(0, n)]
        for blocks in group:
            for s, e in spans:
                if e - s < 2:
                    continue
                b, r, v = table_union(uo[s:e], blocks, k, cap, parent, order[s:e],
                                      None if co is None else co[s:e])
                ob += b
                orow += r
                nv += v
    i, j = forest_edges(parent)
    return j, i, {"buckets": ob, "rows": orow, "pairs": nv}


def group_identical(hashes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(distinct values ascending, index of each distinct value's first row, rows per value, value of each row)."""
    u = as_u64(hashes)
    uniq, first, inverse, counts = np.unique(u, return_index=True, return_inverse=True, return_counts=True)
    return uniq, first.astype(np.int64), counts.astype(np.int64), inverse.astype(np.int64)


def near_duplicate_edges(hashes, k: int, cap: int = 1 << 30):
    """Edges (a, b) of row indices whose connected components are exactly the groups of the "within distance
    k" relation's closure: star edges from every row to the first row of its identical-hash group, and one edge
    between group representatives for every pair of distinct values within distance k.
    Returns (a, b, overflow)."""
    uniq, first, counts, inverse = group_identical(hashes)
    rows = np.arange(len(inverse), dtype=np.int64)
    rep = first[inverse]
    dup = rows != rep
    i, j, overflow = near_pairs(uniq, k, cap, counts)
    a = np.concatenate([rows[dup], first[i]])
    b = np.concatenate([rep[dup], first[j]])
    return a, b, overflow


def lsh_pairs_local(hashes, k: int, cap: int = 1 << 30) -> set[tuple[int, int]]:
    """Every row pair (i < j) within distance k, expanded from the grouped search (small inputs and tests:
    the output itself is quadratic in the size of identical groups)."""
    uniq, first, counts, inverse = group_identical(hashes)
    members = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    group = [members[starts[g]:starts[g + 1]].tolist() for g in range(len(uniq))]
    out: set[tuple[int, int]] = set()
    for g in group:
        out.update((x, y) for xi, x in enumerate(g) for y in g[xi + 1:])
    i, j, _ = near_pairs(uniq, k, cap, counts)
    for a, b in zip(i.tolist(), j.tolist()):
        out.update((min(x, y), max(x, y)) for x in group[a] for y in group[b])
    return out
