"""Near-duplicate search and stage-2 dedup at small sizes: exact recall against brute force (uniform, planted,
identical and skewed hashes), and the distributed connected components against union-find, without Ray (the
same answer from the Ray task form: tests/integration/test_curate_memory.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.curation import dedup, lsh
from tests.helpers.curation import brute_force_pairs
from tests.helpers.dedup import _keys, components, corpus


@pytest.mark.parametrize("k", [0, 3, 6, 8])
def test_search_is_exact_on_planted_identical_and_skewed_hashes(k):
    h = corpus(1500, k, seed=k)
    brute = brute_force_pairs(h, k)
    assert lsh.lsh_pairs_local(h, k) == brute
    # every r gives the same pairs (pigeonhole holds for any number of blocks per key)
    uniq, first, counts, inv = lsh.group_identical(h)
    want = {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(
        lsh.popcount(uniq[:, None] ^ uniq[None, :]) <= k, 1)))}
    for r in (1, 2, 3):
        i, j, _ = lsh.near_pairs(uniq, k, 1 << 30, counts, tables=lsh.plan_tables(k, len(uniq), r))
        assert set(zip(i.tolist(), j.tolist())) == want
    # split by shared key blocks into small parts (the path large corpora take): the same pairs
    i, j, _ = lsh.near_pairs(uniq, k, 1 << 30, counts, part_size=64)
    assert set(zip(i.tolist(), j.tolist())) == want
    # the compact edges (identical groups as stars) connect exactly the brute-force components
    a, b, _ = lsh.near_duplicate_edges(h, k)
    assert len(a) <= len(h) + len(want)  # never all pairs of the flat group
    ba, bb = np.array(sorted(brute)).T
    assert (components(len(h), a, b) == components(len(h), ba, bb)).all()


def test_tables_grow_with_the_corpus_and_keep_occupancy_bounded():
    for k in (6,):  # (k = 8: benchmarks/bench_scale.py; building its large designs takes seconds)
        prev_bits = 0
        for n in (10**4, 10**6, 10**8):
            tables = lsh.plan_tables(k, n)
            bits = min(sum(w for _, w in t) for t in tables)
            assert bits >= prev_bits and n / 2.0 ** bits < 4  # expected random occupancy of a key stays small
            prev_bits = bits
    assert lsh.plan_tables(0, 10**6) == ()  # identical hashes are grouped before any table


def test_cap_bounds_the_work_and_counts_the_overflow():
    rng = np.random.default_rng(2)
    o = rng.integers(0, 2**64, dtype=np.uint64)
    # 60 distinct near-copies sharing most bits: every table key groups them
    u = np.unique(o ^ np.array([1 << int(b) for b in rng.choice(64, 60, replace=False)], np.uint64))
    tables = lsh.plan_tables(2, len(u), 1)
    i, j, over = lsh.near_pairs(u, 2, 1 << 30, tables=tables)
    full = set(zip(i.tolist(), j.tolist()))
    assert len(full) == 60 * 59 // 2 and over == {"buckets": 0, "rows": 0}  # all at distance 2
    i, j, over = lsh.near_pairs(u, 2, 10, tables=tables)
    assert set(zip(i.tolist(), j.tolist())) < full and over["buckets"] >= 1 and over["rows"] >= 60
    # rows count with their multiplicity: 3 distinct values, 4 rows, cap 3 -> one overflowing bucket per table
    i, j, b, r = lsh.table_pairs(u[:3], tables[0], 2, 3, counts=np.array([2, 1, 1]))
    assert len(i) == 3 and (b, r) == (1, 4)
    # one value shared by many rows is no bucket at all (a group, linked by stars)
    assert lsh.table_pairs(u[:1], tables[0], 2, 3, counts=np.array([500])) [2:] == (0, 0)


def _local_pass(rows: pa.Table, key: str, kind: str, parts: int, fn) -> pa.Table:
    """A hash-partition pass without Ray: the same split and per-partition function as the Ray tasks."""
    part = dedup.hash_part(rows[key].to_numpy(), parts) if kind == "int" else dedup.string_part(rows[key], parts)
    outs = [fn(p) for p in dedup.split_by(rows, part, parts)]
    return pa.concat_tables(outs)


def test_partition_functions_match_union_find():
    rng = np.random.default_rng(3)
    keys = _keys(300)
    edges = [(rng.integers(300), rng.integers(300)) for _ in range(260)]
    edges = [(x, y) for x, y in edges if x != y]
    t = pa.table({"a": [keys[x] for x, _ in edges], "b": [keys[y] for _, y in edges]})
    want_root = components(300, np.array([x for x, _ in edges]), np.array([y for _, y in edges]))
    touched = sorted({x for e in edges for x in e})
    # order of keys = order of indices here? use the real minimum key of each component instead
    comp_min = {}
    for x in touched:
        comp_min.setdefault(want_root[x], []).append(keys[x])
    want = {keys[x]: min(comp_min[want_root[x]]) for x in touched}
    local = dedup.local_components(t)
    got = dict(zip(local["a"].to_pylist(), local["b"].to_pylist()))
    assert {n: got.get(n, n) for n in want} == want
    for parts in (1, 3):
        cur = t
        for _ in range(30):
            large = _local_pass(dedup.both_directions(cur), "node", "string", parts, dedup.large_star)
            small = _local_pass(dedup.oriented(large), "node", "string", parts, dedup.small_star)
            changed = sum(large["changed"].to_pylist()) + sum(small["changed"].to_pylist())
            cur = small.select(["a", "b"])
            if not changed:
                break
        got = dict(zip(cur["a"].to_pylist(), cur["b"].to_pylist()))
        assert {n: got.get(n, n) for n in want} == want


def test_identical_groups_star_to_the_best_key():
    keys = _keys(6)
    rows = pa.table({"key": keys, "phash": [5, 5, 7, 5, 9, 7]})
    nodes, stars = dedup.identical_groups(rows)
    assert nodes["phash"].to_pylist() == [5, 7, 9] and nodes["count"].to_pylist() == [3, 2, 1]
    best5 = min(keys[0], keys[1], keys[3])
    assert nodes["key"].to_pylist()[0] == best5
    assert sorted(zip(stars["a"].to_pylist(), stars["b"].to_pylist())) == sorted(
        [(x, best5) for x in (keys[0], keys[1], keys[3]) if x != best5] + [(max(keys[2], keys[5]),
                                                                             min(keys[2], keys[5]))])
