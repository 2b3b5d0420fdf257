"""Category balancing (paper s4.1 "category-level de-duplication and balancing"; MetaCLIP-style cap t).

Category = the URL list's category column when given, else a k-means cluster id on the cheap embedding of
analysis.py. Centroids are fitted on a deterministic sample (rows with the smallest id-hash priority, so the
sample does not depend on block layout), every row is assigned in parallel, and each category keeps at most
t rows: those with the smallest seeded priority hash(seed, id).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa


def priority(seed: int, rid: str, purpose: str = "balance") -> int:
    """Seeded 63-bit priority of a row id (stable across processes and machines)."""
    h = hashlib.blake2b(f"{seed}\x1f{purpose}\x1f{rid}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


def add_priority(batch: pa.Table, seed: int, purpose: str) -> pa.Table:
    pr = [priority(seed, r, purpose) for r in batch["id"].to_pylist()]
    return batch.append_column("prio", pa.array(pr, pa.int64()))


def kmeans_fit(x: np.ndarray, k: int, seed: int, iters: int = 30) -> np.ndarray:
    """Seeded k-means++ initialisation + Lloyd iterations (float64 for reproducible sums)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        idx = int(rng.integers(n)) if total <= 0 else int(rng.choice(n, p=d2 / total))
        centres.append(x[idx])
        d2 = np.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = np.stack(centres)
    for _ in range(iters):
        lab = assign(x, c)
        new = c.copy()
        for j in range(k):
            members = x[lab == j]
            if len(members):
                new[j] = members.mean(0)
        if np.allclose(new, c):
            break
        c = new
    return c


def assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    d = (x * x).sum(1)[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return np.argmin(d, axis=1)


def cluster_name(j: int) -> str:
    return f"cluster-{int(j):03d}"


def assign_categories(batch: pa.Table, centres: np.ndarray | None) -> pa.Table:
    """category/category_source from the list column, else from the nearest centre."""
    listed = batch["list_category"].to_pylist()
    cats, srcs = list(listed), ["list" if c is not None else "none" for c in listed]
    todo = [i for i, c in enumerate(listed) if c is None]
    if todo and centres is not None:
        emb = np.asarray([batch["embedding"][i].as_py() for i in todo], dtype=np.float64)
        lab = assign(emb, centres)
        for i, j in zip(todo, lab):
            cats[i], srcs[i] = cluster_name(j), "kmeans"
    for i in todo:
        if cats[i] is None:
            cats[i] = "none"
    batch = batch.drop_columns(["embedding", "list_category"])
    return batch.append_column("category", pa.array(cats, pa.string())).append_column(
        "category_source", pa.array(srcs, pa.string()))


def cap_group(group: pa.Table, cap: int) -> pa.Table:
    """Mark rows of one category beyond the t lowest priorities as capped (deterministic order)."""
    prio = group["prio"].to_numpy(zero_copy_only=False)
    ids = np.asarray(group["id"].to_pylist(), dtype=object)
    order = sorted(range(len(prio)), key=lambda i: (int(prio[i]), ids[i]))
    capped = np.zeros(len(prio), dtype=bool)
    capped[order[cap:]] = True
    return group.append_column("capped", pa.array(capped))


def kmeans_peak_bytes(n: int, dim: int, k: int) -> int:
    """Stated peak of fitting the centres on the driver as the code stands (pipelines/curate.fit_centres): up to
    2n sampled rows taken as Python dicts (~32 B per embedding value), the float64 sample, and `assign`'s
    n x k float64 distance matrix plus its temporaries (3 copies)."""
    return 2 * n * (dim * 32 + 256) + 8 * n * dim + 3 * 8 * n * k
