"""Category balancing (paper s4.1 "category-level de-duplication and balancing"; MetaCLIP-style cap t).

Category = the URL list's category column when given, else a k-means cluster id on the cheap embedding of
analysis.py. Centroids are fitted on a deterministic sample (rows with the smallest id-hash priority, so the
sample does not depend on block layout), every row is assigned in parallel, and each category keeps at most
t rows: those with the smallest seeded priority hash(seed, id).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def priority(seed: int, rid: str, purpose: str = "balance") -> int:
    """Seeded 63-bit priority of a row id (stable across processes and machines)."""
    h = hashlib.blake2b(f"{seed}\x1f{purpose}\x1f{rid}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


def add_priority(batch: pa.Table, seed: int, purpose: str) -> pa.Table:
    pr = [priority(seed, r, purpose) for r in batch["id"].to_pylist()]
    return batch.append_column("prio", pa.array(pr, pa.int64()))


# The fit scales to the shipped cluster setting (a 1M-row sample, 4,096 clusters) in bounded memory: the sample
# itself (float32) plus a few k-sized and chunk-sized buffers; never an n x k matrix.
KMEANS_ITERS = 50  # Lloyd iterations at most
KMEANS_INIT_PER_CLUSTER = 8  # k-means++ runs on a subsample of 8 rows per cluster (at least 16,384 rows)
KMEANS_INIT_MIN = 16_384
KMEANS_NEIGHBOURS = 64  # a row's candidate centres after the first pass: the 64 centres nearest its own
KMEANS_CHUNK = 4096  # rows per distance block of a full pass (chunk x k float32)
KMEANS_TOL = 1e-4  # stop when fewer than this share of the rows change cluster in a full pass


def kmeans_peak_bytes(n: int, dim: int, k: int) -> int:
    """The k-means fit's peak: the sample as float32 (n x dim x 4; the task that fits also holds the sample's
    rows as read, the same again), its labels and norms (n x 24), one distance block of a full pass and its
    argmin (2 x chunk x k x 4), the centres, their float64 sums and the centre-to-centre distances (k x dim x 24
    + k x k x 4), the k-means++ subsample (KMEANS_INIT_PER_CLUSTER x k x dim x 4), plus 64 MiB."""
    m = min(n, max(KMEANS_INIT_MIN, KMEANS_INIT_PER_CLUSTER * k))
    return int(2 * n * dim * 4 + 24 * n + 2 * KMEANS_CHUNK * k * 4 + 24 * k * dim + 4 * k * k + 12 * m * dim
               + 64 * 2**20)


def _sqdist(x: np.ndarray, c: np.ndarray, cn: np.ndarray) -> np.ndarray:
    """Squared distances minus |x|^2 (enough for an argmin over centres): |c|^2 - 2 x.c, float32, in place."""
    d = x @ c.T
    d *= -2.0
    d += cn
    return d


def _init_centres(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ (each step draws 2 + ln k candidates by squared distance and keeps the one that lowers
    the potential most; Arthur & Vassilvitskii 2007, greedy variant as in Grunau et al. 2023) on a seeded
    subsample: k steps of one small matrix product each, instead of k passes over the whole sample."""
    n = len(x)
    m = min(n, max(KMEANS_INIT_MIN, KMEANS_INIT_PER_CLUSTER * k))
    sub = x if m == n else x[np.sort(rng.choice(n, m, replace=False))]
    sn = np.einsum("ij,ij->i", sub, sub)
    trials = 2 + int(math.log(k)) if k > 1 else 1
    chosen = np.empty(k, np.int64)
    chosen[0] = rng.integers(m)
    d2 = np.maximum(_sqdist(sub, sub[chosen[:1]], sn[chosen[:1]])[:, 0] + sn, 0).astype(np.float64)
    for i in range(1, k):
        total = d2.sum()
        if total <= 0:
            cand = rng.integers(m, size=trials)
        else:
            cand = np.minimum(np.searchsorted(np.cumsum(d2), rng.random(trials) * total), m - 1)
        dc = np.maximum(_sqdist(sub, sub[cand], sn[cand]) + sn[:, None], 0)
        pot = np.minimum(d2[:, None], dc).sum(0)
        best = int(np.argmin(pot))
        chosen[i] = cand[best]
        d2 = np.minimum(d2, dc[:, best])
    return sub[chosen].astype(np.float64)


def _full_assign(x: np.ndarray, c32: np.ndarray, cn: np.ndarray, out: np.ndarray) -> None:
    for s in range(0, len(x), KMEANS_CHUNK):
        out[s:s + KMEANS_CHUNK] = np.argmin(_sqdist(x[s:s + KMEANS_CHUNK], c32, cn), axis=1)


def _near_assign(x: np.ndarray, c32: np.ndarray, cn: np.ndarray, labels: np.ndarray, out: np.ndarray) -> None:
    """Each row's nearest centre among the KMEANS_NEIGHBOURS centres nearest its current one (its own
    included, so no row moves farther): rows grouped by current centre, one small product per centre."""
    k = len(c32)
    m = min(k, KMEANS_NEIGHBOURS)
    cc = _sqdist(c32, c32, cn)  # |c_j|^2 - 2 c_i.c_j: the row order of |c_i - c_j| for each i
    cc[np.arange(k), np.arange(k)] = -np.inf  # own centre first
    nb = np.argpartition(cc, m - 1, axis=1)[:, :m] if m < k else np.argsort(cc, axis=1)
    del cc
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    for a in range(k):
        idx = order[bounds[a]:bounds[a + 1]]
        if len(idx):
            cand = np.sort(nb[a])
            out[idx] = cand[np.argmin(_sqdist(x[idx], c32[cand], cn[cand]), axis=1)]


def _means(x: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Per-cluster means (float64 sums in row order; an empty cluster keeps its centre)."""
    from scipy.sparse import csr_matrix

    k, dim = centres.shape
    sums = np.zeros((k, dim))
    for s in range(0, len(x), 65536):
        lab = labels[s:s + 65536]
        onehot = csr_matrix((np.ones(len(lab)), (lab, np.arange(len(lab)))), shape=(k, len(lab)))
        sums += onehot @ x[s:s + 65536].astype(np.float64)
    counts = np.bincount(labels, minlength=k)
    new = centres.copy()
    full = counts > 0
    new[full] = sums[full] / counts[full, None]
    return new


def kmeans_fit(x: np.ndarray, k: int, seed: int, iters: int = KMEANS_ITERS) -> np.ndarray:
    """Seeded k-means: greedy k-means++ on a subsample (_init_centres), one full assignment, then Lloyd
    iterations whose assignment looks only at the centres nearest each row's own (_near_assign: the inertia
    never rises), with a full assignment to confirm convergence (fewer than KMEANS_TOL of the rows moving).
    Float32 distances in blocks of KMEANS_CHUNK rows, float64 sums in row order: the same centres for the same
    sample and seed. Memory: kmeans_peak_bytes. Returns float64 centres (k x dim)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    k = max(1, min(int(k), n))
    rng = np.random.default_rng(seed)
    c = _init_centres(x, k, rng)
    labels = np.empty(n, np.int64)
    new = np.empty(n, np.int64)
    c32 = c.astype(np.float32)
    _full_assign(x, c32, np.einsum("ij,ij->i", c32, c32), labels)
    full_pass = True
    for _ in range(iters):
        c = _means(x, labels, c)
        c32 = c.astype(np.float32)
        cn = np.einsum("ij,ij->i", c32, c32)
        restricted = k > KMEANS_NEIGHBOURS
        if restricted:
            _near_assign(x, c32, cn, labels, new)
        else:
            _full_assign(x, c32, cn, new)
        moved = int((new != labels).sum())
        labels, new = new, labels
        full_pass = not restricted
        if moved <= KMEANS_TOL * n:
            if full_pass:
                break
            _full_assign(x, c32, cn, new)  # converged among the neighbours: does any row want a far centre?
            moved = int((new != labels).sum())
            labels, new = new, labels
            full_pass = True
            if moved <= KMEANS_TOL * n:
                break
    return _means(x, labels, c)


def inertia(x: np.ndarray, centres: np.ndarray) -> float:
    """Sum of squared distances of the rows to their nearest centre (float64 total), in blocks."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    c32 = np.asarray(centres, np.float32)
    cn = np.einsum("ij,ij->i", c32, c32)
    total = 0.0
    for s in range(0, len(x), KMEANS_CHUNK):
        xc = x[s:s + KMEANS_CHUNK]
        d = _sqdist(xc, c32, cn).min(1) + np.einsum("ij,ij->i", xc, xc)
        total += float(np.maximum(d, 0).astype(np.float64).sum())
    return total


def assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Nearest centre of each row (float32 distances in blocks of KMEANS_CHUNK rows: chunk x k at a time)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    c32 = np.asarray(centres, np.float32)
    out = np.empty(len(x), np.int64)
    _full_assign(x, c32, np.einsum("ij,ij->i", c32, c32), out)
    return out


def cluster_name(j: int) -> str:
    return f"cluster-{int(j):03d}"


def assign_peak_bytes(rows: int, dim: int, k: int) -> int:
    """A batch of assign_categories: its embeddings as float32 (rows x dim x 4, twice: flattened and copied) and
    one distance block (KMEANS_CHUNK x k x 4, with its argmin), plus 16 MiB."""
    return int(8 * rows * dim + 2 * KMEANS_CHUNK * k * 4 + 16 * 2**20)


def assign_categories(batch: pa.Table, centres: np.ndarray | None) -> pa.Table:
    """category/category_source from the list column, else from the nearest centre (vectorised: the rows without
    a listed category are assigned in blocks of KMEANS_CHUNK)."""
    listed = batch["list_category"]
    listed = listed.combine_chunks() if isinstance(listed, pa.ChunkedArray) else listed
    todo = pc.is_null(listed)
    cats, srcs = listed, pc.if_else(todo, pa.scalar("none"), pa.scalar("list"))
    idx = np.flatnonzero(todo.to_numpy(zero_copy_only=False))
    if len(idx) and centres is not None:
        emb = batch["embedding"].take(pa.array(idx))
        emb = emb.combine_chunks() if isinstance(emb, pa.ChunkedArray) else emb
        flat = pc.list_flatten(emb).to_numpy(zero_copy_only=False)
        lab = assign(flat.reshape(len(idx), -1), centres)
        names = pa.array([cluster_name(j) for j in range(len(centres))], pa.string())
        cats = pc.replace_with_mask(listed, todo, names.take(pa.array(lab)))
        srcs = pc.if_else(todo, pa.scalar("kmeans"), pa.scalar("list"))
    cats = pc.fill_null(cats, "none")
    batch = batch.drop_columns(["embedding", "list_category"])
    return batch.append_column("category", cats.cast(pa.string())).append_column(
        "category_source", srcs.cast(pa.string()))


# ---------------------------------------------------------------- the per-category cap, in bounded pieces
# Each category keeps its `cap` rows of smallest (priority, id). Instead of gathering a category's rows in one
# group (a listed category can hold a large share of the corpus), every block counts its rows per category; a
# category over the cap gets a priority limit that about cap + 6 sd of its rows fall under (the priorities are
# uniform hashes); only the rows under the limit are shuffled by category, where the exact cap-th (priority, id)
# is found; every block then marks its rows above that threshold. The decisions equal a sort of each whole
# category. (pyarrow group-bys and joins here run single-threaded: inside a Ray worker, Acero's thread pool once
# failed with "thread index 10 is out of range [0, 10)"; the inputs are one block.)

CAP_SCHEMA = pa.schema([pa.field("category", pa.string()), pa.field("prio", pa.int64()), pa.field("id", pa.string())])
THRESHOLD_SCHEMA = pa.schema([pa.field("category", pa.string()), pa.field("t_prio", pa.int64()),
                              pa.field("t_id", pa.string()), pa.field("candidates", pa.int64())])


def category_counts(block: pa.Table) -> dict[str, int]:
    """Rows per category of one block."""
    if block.num_rows == 0:
        return {}
    g = block.group_by("category", use_threads=False).aggregate([("category", "count")])
    return dict(zip(g["category"].to_pylist(), g["category_count"].to_pylist()))


def prio_limit(cap: int, n: int) -> int:
    """Priority limit under which at least `cap` of a category's n uniform 63-bit priorities fall, but for about
    once in a billion (the expected count plus six standard deviations)."""
    rate = min(1.0, (cap + 6.0 * math.sqrt(cap) + 64.0) / max(1, n))
    return min(2**63 - 1, int(rate * 2**63))


def cap_candidates(block: pa.Table, limits: pa.Table) -> pa.Table:
    """The rows of one block (category, prio, id) that can be among their category's first `cap`: those of a
    category in `limits` (category, limit) with a priority at or under its limit."""
    if block.num_rows == 0 or limits.num_rows == 0:
        return CAP_SCHEMA.empty_table()
    j = block.select(["category", "prio", "id"]).join(limits, keys="category", join_type="inner", use_threads=False)
    return j.filter(pc.less_equal(j["prio"], j["limit"])).select(CAP_SCHEMA.names).cast(CAP_SCHEMA)


def cap_thresholds(candidates: pa.Table, cap: int) -> pa.Table:
    """Per category of the candidates: the cap-th smallest (prio, id), and how many candidates it had (fewer
    than cap: the limit was too low, ask again with a higher one)."""
    if candidates.num_rows == 0:
        return THRESHOLD_SCHEMA.empty_table()
    t = candidates.take(pc.sort_indices(candidates, sort_keys=[("category", "ascending"), ("prio", "ascending"),
                                                               ("id", "ascending")]))
    cat = t["category"].combine_chunks() if isinstance(t["category"], pa.ChunkedArray) else t["category"]
    enc = cat.dictionary_encode().indices.to_numpy(zero_copy_only=False)
    first = np.flatnonzero(np.concatenate([[True], enc[1:] != enc[:-1]]))
    size = np.diff(np.concatenate([first, [len(enc)]]))
    at = first + np.minimum(size, cap) - 1
    return pa.table({"category": cat.take(pa.array(first)), "t_prio": t["prio"].take(pa.array(at)),
                     "t_id": t["id"].take(pa.array(at)), "candidates": size}, schema=THRESHOLD_SCHEMA)


def apply_caps(block: pa.Table, thresholds: pa.Table) -> pa.Table:
    """Mark "category_cap" on the rows of one block that come after their category's threshold (prio, id)."""
    if block.num_rows == 0 or thresholds.num_rows == 0:
        return block
    j = block.join(thresholds.select(["category", "t_prio", "t_id"]), keys="category", join_type="left outer",
                   use_threads=False)
    after = pc.or_(pc.greater(j["prio"], j["t_prio"]),
                   pc.and_(pc.equal(j["prio"], j["t_prio"]), pc.greater(j["id"], j["t_id"])))
    capped = pc.fill_null(after, False)
    reason = pc.if_else(capped, pa.scalar("category_cap"), j["drop_reason"])
    j = j.set_column(j.schema.get_field_index("drop_reason"), "drop_reason", reason)
    return j.drop_columns(["t_prio", "t_id"])


def cap_peak_bytes(in_bytes: int) -> int:
    """A cap task over `in_bytes` of rows (a block, or a partition of candidates): the rows, one joined or sorted
    copy with its keys, and the output (4 x in_bytes), plus 32 MiB."""
    return 4 * int(in_bytes) + 32 * 2**20
