"""Near-duplicate test data shared by the dedup tests (tests/unit/test_curate_dedup.py) and the stage-2 memory
tests on Ray (tests/integration/test_curate_memory.py): a hash corpus with planted near-copies, union-find
components to compare against, and node keys."""

from __future__ import annotations

import numpy as np

from pipelines.curation import dedup


def corpus(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Uniform hashes plus planted pairs at distance 0..k, a flat group sharing one hash, and clusters of
    near-copies (each copy 1..k bits from its original)."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    out = [h]
    for d in range(k + 1):  # planted pairs at every distance
        src = h[rng.integers(0, n, 6)]
        masks = np.array([sum(1 << int(b) for b in rng.choice(64, d, replace=False)) for _ in src], np.uint64)
        out.append(src ^ masks)
    out.append(np.full(40, h[0]))  # many flat images sharing one hash
    for c in range(3):  # clusters of near-copies
        o = h[1 + c]
        flips = [sum(1 << int(b) for b in rng.choice(64, 1 + i % max(k, 1), replace=False)) for i in range(30)]
        out.append(o ^ np.array(flips, np.uint64))
    return np.concatenate(out).view(np.int64)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    parent = np.arange(n)

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = find(x), find(y)
        parent[max(rx, ry)] = min(rx, ry)
    return np.array([find(x) for x in range(n)])


def _keys(n: int) -> list[str]:
    return [dedup.node_key(100 + i % 7, 100, 100.0, float(i % 5), f"{i:032x}", "u" * 24, i) for i in range(n)]
