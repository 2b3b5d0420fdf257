"""The balance stage's k-means fit as it was before the scalable one (pipelines/curation/balance.kmeans_fit): a
seeded k-means++ initialisation over the whole sample (one pass per centre) and Lloyd iterations with the full
n x k float64 distance matrix, at most 30. Kept only as the quality reference the new fit is compared with
(tests/test_curate_memory.py, benchmarks/bench_memory.py --section kmeans)."""

from __future__ import annotations

import numpy as np


def _assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return np.argmin(d, axis=1)


def kmeans_fit_reference(x: np.ndarray, k: int, seed: int, iters: int = 30) -> np.ndarray:
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
        lab = _assign(x, c)
        new = c.copy()
        for j in range(k):
            members = x[lab == j]
            if len(members):
                new[j] = members.mean(0)
        if np.allclose(new, c):
            break
        c = new
    return c
