"""Stage 2's memory bounds at small sizes on real Ray: shuffle pieces stay out of the driver's heap whatever their
number, each near-duplicate search task reads only its own hashes, a huge run of near-copies is searched in
bounded memory with a counted overflow, the k-means fit matches or beats the previous one and is deterministic
per seed (whatever the block layout), and the per-category cap equals a sort of each whole category.
(The growth with the corpus itself is measured by benchmarks/bench_memory.py.)"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from jobkit.config import config_from_dict
from jobkit.memprobe import rss_bytes
from pipelines import curate
from pipelines.curation import balance, dedup, lsh
from tests.helpers.curation import brute_force_pairs
from tests.helpers.dedup import _keys, components, corpus
from tests.helpers.kmeans_reference import kmeans_fit_reference


def _key_phash_blocks(ray, rows: int, blocks: int):
    rng = np.random.default_rng(5)
    h = rng.integers(-2**63, 2**63 - 1, rows, dtype=np.int64)
    keys = pa.array(_keys(rows))
    per = rows // blocks
    return [ray.put(pa.table({"key": keys.slice(s, per), "phash": h[s:s + per]})) for s in range(0, rows, per)]


def test_driver_memory_does_not_grow_with_the_number_of_shuffle_pieces(ray_local):
    """200k rows (~20 MB of key + pHash) split over 8 or 400 blocks, 60 partitions: 480 or 24,000 pieces of the
    previous map tasks (one per block), most of them under Ray's 100 KiB inline limit, i.e. kept in the driver's
    heap. Map tasks now gather blocks until their pieces average SHUFFLE_PIECE_BYTES, so the pieces live in the
    object store and the driver's RSS holds only references, the same for both layouts."""
    parts, rows = 60, 200_000
    growth = {}
    for blocks in (8, 400):
        refs = _key_phash_blocks(ray_local, rows, blocks)
        sizes = [rows // blocks * dedup.ROW_BYTES["key_phash"]] * blocks
        groups = dedup.map_groups(sizes, parts)
        assert len(groups) == 1  # 20 MB < 60 x 512 KiB: one map task, whatever the number of blocks
        before = rss_bytes()
        pieces, prow = dedup.hash_shuffle(refs, dedup._key_phash, "phash", parts, "int", sizes)
        ray_local.wait([p for ps in pieces for p in ps], num_returns=parts, fetch_local=False)
        growth[blocks] = rss_bytes() - before
        assert int(prow.sum()) == rows and sum(len(ps) for ps in pieces) == parts
        got = ray_local.get(pieces[7])  # the pieces are real: partition 7's rows all hash to 7
        assert all((dedup.hash_part(p["phash"].to_numpy(), parts) == 7).all() for p in got)
        del pieces, refs, got
    assert max(growth.values()) < 8 * 2**20, growth  # inline pieces would add ~20 MB (the data itself)


def test_search_tasks_read_only_their_own_partition_and_find_the_same_groups(ray_local):
    k = 6
    h = corpus(3000, k, seed=11)
    keys = _keys(len(h))
    brute = np.array(sorted(brute_force_pairs(h, k))).T
    root = components(len(h), brute[0], brute[1])
    members: dict = {}
    for x in range(len(h)):
        members.setdefault(root[x], []).append(keys[x])
    want = {keys[x]: min(members[root[x]]) for x in range(len(h)) if keys[x] != min(members[root[x]])}
    uniq = np.unique(h)
    nodes = pa.table({"phash": uniq, "count": np.ones(len(uniq), np.int64)})
    per = 700
    refs = [ray_local.put(nodes.slice(s, per)) for s in range(0, len(uniq), per)]
    rows = [min(per, len(uniq) - s) for s in range(0, len(uniq), per)]
    task_hashes = 400
    _, _, overflow, plan = dedup.near_search(refs, rows, k, 1000, 2, task_hashes)
    # every group of tables deals each hash to exactly one of its tasks, and no task gets more than its share
    assert plan["tasks"] > plan["groups"] > 1 and plan["most_hashes"] <= task_hashes
    assert sum(plan["hashes_per_task"]) == plan["groups"] * len(uniq)
    blocks = [ray_local.put(pa.table({"key": keys, "phash": h}).slice(s, 500)) for s in range(0, len(h), 500)]
    out, info = dedup.find_duplicates(blocks, k, 1000, parts=3, search_tasks=2, task_hashes=task_hashes,
                                      log=lambda m: None)
    got = pa.concat_tables(ray_local.get(out))
    assert dict(zip(got["a"].to_pylist(), got["b"].to_pylist())) == want
    assert info["search_task_most_hashes"] <= task_hashes and overflow["buckets"] == 0


def test_a_huge_run_of_near_copies_is_searched_in_bounded_memory_with_a_counted_overflow():
    """3,000 distinct near-copies (1..k bits) of one hash among 20,000 random ones, max_bucket 50: the pair list
    of the capped comparisons is ~L x cap (tens of MB here, hundreds of GB for a 100k run at cap 1000); the
    forest holds one edge per hash, joins every copy to the original, and counts the overflow."""
    k, run, cap = 6, 3000, 50
    rng = np.random.default_rng(3)
    o = rng.integers(0, 2**63, dtype=np.uint64)
    d = 1 + np.arange(run) % k
    bits = rng.random((run, 64)).argsort(axis=1)[:, :k]
    mask = np.zeros(run, np.uint64)
    for c in range(k):
        mask[d > c] |= np.uint64(1) << bits[d > c, c].astype(np.uint64)
    u = np.unique(np.concatenate([rng.integers(0, 2**64, 20_000, dtype=np.uint64), [o], o ^ mask]))
    tables = lsh.plan_tables(k, len(u))
    tracemalloc.start()
    i, j, info = lsh.near_forest(u, k, cap, tables=tables)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(i) < len(u) and info["buckets"] >= 1 and info["rows"] >= run
    assert info["pairs"] > 20 * len(u)  # the verified pairs it merged would not have fit the bound below
    assert peak < 400 * len(u) + 4 * 2**20, peak
    label = components(len(u), i, j)
    assert (label[np.searchsorted(u, o ^ mask)] == label[np.searchsorted(u, o)]).all()
    # the forest's components are exactly those of the capped pair list
    pi, pj, pov = lsh.near_pairs(u, k, cap, tables=tables)
    assert (components(len(u), pi, pj) == label).all()
    assert (pov["buckets"], pov["rows"]) == (info["buckets"], info["rows"])


def _blobs(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.random((40, dim), dtype=np.float32)
    lab = rng.integers(0, 40, n)
    return (centres[lab] + rng.standard_normal((n, dim), dtype=np.float32) * rng.uniform(0.03, 0.2, 40)[lab, None]
            ).astype(np.float32)


@pytest.mark.parametrize("n,k", [(3000, 12), (4000, 160)])
def test_kmeans_is_as_good_as_the_previous_fit_and_deterministic_per_seed(n, k):
    x = _blobs(n, 16, 1)
    ratios = []
    for seed in (0, 1, 2):
        c = balance.kmeans_fit(x, k, seed)
        assert c.shape == (k, 16) and np.array_equal(c, balance.kmeans_fit(x, k, seed))
        ratios.append(balance.inertia(x, c) / balance.inertia(x, kmeans_fit_reference(x, k, seed)))
    assert not np.array_equal(balance.kmeans_fit(x, k, 0), balance.kmeans_fit(x, k, 1))
    assert np.mean(ratios) <= 1.0 and max(ratios) <= 1.002, ratios  # per seed: a different local optimum


def test_fit_centres_is_the_same_for_any_block_layout(ray_local):
    """fit_centres in a Ray task: the same sample (smallest seeded priorities), in the same order, and the same
    centres whether the rows come in 3 blocks or 17."""
    import ray.data

    n = 6000
    x = _blobs(n, 8, 2)
    t = pa.table({"id": [f"{i:032x}" for i in range(n)], "unlabelled": np.ones(n, np.int8),
                  "embedding": pa.FixedSizeListArray.from_arrays(x.ravel(), 8).cast(pa.list_(pa.float32()))})
    ccfg = config_from_dict({"curate": {"balance": {"num_clusters": 10, "sample_size": 2500,
                                                    "kmeans_num_cpus": 1}}}).curate
    got = []
    for blocks in (3, 17):
        meta = ray.data.from_arrow(t).repartition(blocks).materialize()
        centres, unlabelled = curate.fit_centres(meta, ccfg, seed=4)
        assert unlabelled == n and centres.shape == (10, 8)
        got.append(centres)
    assert np.array_equal(got[0], got[1])
    order = sorted(range(n), key=lambda i: (balance.priority(4, t["id"][i].as_py(), "kmeans-sample"), i))
    assert np.array_equal(got[0], balance.kmeans_fit(x[order[:2500]], 10, 4))


def test_category_cap_in_bounded_pieces_equals_a_sort_of_each_category(ray_local):
    import ray.data

    rng = np.random.default_rng(0)
    n, cap = 12_000, 400
    cats = rng.choice(["big", "mid", "small", "tiny"], n, p=[0.7, 0.2, 0.08, 0.02])
    ids = [f"{i:032x}" for i in rng.permutation(n)]
    t = pa.table({"unit": ["u" * 24] * n, "row": np.arange(n, dtype=np.int32), "kind": np.ones(n, np.int8),
                  "id": ids, "category": cats, "category_source": ["list"] * n,
                  "duplicate_of": pa.nulls(n, pa.string()), "drop_reason": pa.nulls(n, pa.string()),
                  "ledger_gen": pa.nulls(n, pa.int32())})
    t = balance.add_priority(t, 9, "balance")
    singles = ray.data.from_arrow(t).repartition(7).materialize()
    out = pa.concat_tables(ray_local.get(curate.apply_category_cap(singles, cap, parts=3)))
    assert out.num_rows == n
    kept = {i for i, r in zip(out["id"].to_pylist(), out["drop_reason"].to_pylist()) if r is None}
    want: set = set()
    for c in ("big", "mid", "small", "tiny"):
        rows = sorted((p, i) for p, i, cc in zip(t["prio"].to_pylist(), ids, cats.tolist()) if cc == c)
        want |= {i for _, i in rows[:cap]}
    assert kept == want and len(kept) == 3 * cap + int((cats == "tiny").sum())


def test_write_task_streams_the_ledger_and_the_shard_slice_by_slice(tmp_path, monkeypatch):
    """A ledger of several row groups (rows in crawl order, some filtered out) becomes a shard of several row
    groups, one per slice, with every "ok" row's decision and the kept rows' exact bytes; neither file has a
    dictionary page on its image column (a reader can stream it page by page)."""
    import json

    import pyarrow.parquet as pq

    from pipelines.curation import writer
    from pipelines.curation.stage1 import LedgerWriter, ledger_uri

    monkeypatch.setattr(writer, "WRITE_SLICE_BYTES", 64 * 2**10)
    out, key, rng = str(tmp_path / "out"), "ab" * 12, np.random.default_rng(1)
    images = {r: rng.bytes(16 * 2**10) for r in range(60)}
    sink = LedgerWriter(ledger_uri(out, key), "", 200 * 2**10)
    for r in rng.permutation(60).tolist():
        ok = r % 7 != 0
        sink.add({"unit": key, "row": r, "source": f"s://{r}", "reason": "ok" if ok else "too_small",
                  "id": f"{r:032x}", "image": images[r] if ok else None, "format": "png", "width": 9, "height": 9,
                  "phash": r, "embedding": [0.0] * 4})
    sink.commit()
    ok_rows = [r for r in range(60) if r % 7]
    drop = {r: ("duplicate" if r % 5 == 0 else "category_cap" if r % 5 == 1 else None) for r in ok_rows}
    group = pa.table({
        "unit": [key] * (len(ok_rows) + 1), "row": pa.array([-1] + ok_rows, pa.int32()),
        "kind": pa.array([writer.KIND_MARKER] + [writer.KIND_DECISION] * len(ok_rows), pa.int8()),
        "id": [None] + [f"{r:032x}" for r in ok_rows], "category": [None] + [f"c{r % 3}" for r in ok_rows],
        "category_source": [None] + ["list"] * len(ok_rows),
        "duplicate_of": [None] + [f"{0:032x}" if drop[r] == "duplicate" else None for r in ok_rows],
        "drop_reason": [None] + [drop[r] for r in ok_rows],
        "ledger_gen": pa.array([0] + [None] * len(ok_rows), pa.int32())}, schema=writer.DECISION_SCHEMA)
    stats = json.loads(writer.write_unit_shard(group, out, "", "fp")["stats"][0].as_py())
    shard = pq.ParquetFile(writer.shard_uri(out, key))
    ledger = pq.ParquetFile(ledger_uri(out, key))
    assert ledger.metadata.num_row_groups > 1 and shard.metadata.num_row_groups > 2
    for f in (shard, ledger):
        image = f.schema_arrow.names.index("image")
        assert not any(f.metadata.row_group(g).column(image).has_dictionary_page
                       for g in range(f.metadata.num_row_groups))
    rows = {int(r["id"], 16): r for r in shard.read().to_pylist()}
    assert sorted(rows) == ok_rows
    for r, got in rows.items():
        assert got["drop_reason"] == drop[r] and got["kept"] == (drop[r] is None) and got["category"] == f"c{r % 3}"
        assert got["image"] == (images[r] if drop[r] is None else None)
        assert got["duplicate_of"] == (f"{0:032x}" if drop[r] == "duplicate" else None)
    assert (stats["kept"], stats["duplicates"], stats["capped"]) == (
        sum(d is None for d in drop.values()), sum(d == "duplicate" for d in drop.values()),
        sum(d == "category_cap" for d in drop.values()))
    assert stats["ok"] == len(ok_rows) and stats["filtered"] == {"too_small": 60 - len(ok_rows)}


def test_ray_form_finds_the_same_groups(ray_local):
    k = 6
    h = corpus(1200, k, seed=11)
    keys = _keys(len(h))
    rows = pa.table({"key": keys, "phash": h})
    blocks = [ray_local.put(rows.slice(s, 500)) for s in range(0, len(h), 500)]
    brute = np.array(sorted(brute_force_pairs(h, k))).T
    root = components(len(h), brute[0], brute[1])
    members = {}
    for x in range(len(h)):
        members.setdefault(root[x], []).append(keys[x])
    want = {keys[x]: min(members[root[x]]) for x in range(len(h)) if keys[x] != min(members[root[x]])}
    for local_max in (10**6, 0):  # scipy in one task and distributed star contraction
        refs, info = dedup.find_duplicates(blocks, k, 1000, parts=3, search_tasks=2,
                                           local_max_edges=local_max, log=lambda m: None)
        got = pa.concat_tables(ray_local.get(refs))
        assert dict(zip(got["a"].to_pylist(), got["b"].to_pylist())) == want
        assert info["components"] == ("one task" if local_max else "distributed")
        assert info["bucket_overflow"] == {"buckets": 0, "rows": 0}
