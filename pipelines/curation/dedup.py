"""Exact and near-duplicate detection as distributed Ray Data group-bys, plus connected components.

Every stage-1 "ok" row becomes a graph node named by a sortable key whose lexicographic minimum is the best
member of any group (most pixels, then least lossy encoding, then native sharpness, then smallest id; see
node_key). Edges come from
  - exact: group by the pixel sha256; every member links to the group minimum;
  - near: explode each row into (band, band value) for the k+1 LSH bands (lsh.py), group by bucket, verify
    candidates exactly (Hamming <= k), cap bucket sizes (overflow counted).
Connected components use the large-star / small-star iteration (Kiveris et al., "Connected Components in
MapReduce and Beyond", 2014), each step a group-by over the edge dataset, until the edges form stars around
each component's minimum. Then duplicate_of of a node is the id inside its star centre's key. Nothing here
collects rows, hashes or edges on the driver; only counters cross to it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.curation.lsh import band_bucket_pairs, band_values

EDGE_SCHEMA = pa.schema([pa.field("a", pa.string()), pa.field("b", pa.string()),
                         pa.field("overflow", pa.int64())])
PAIR_SCHEMA = pa.schema([pa.field("a", pa.string()), pa.field("b", pa.string())])
BUCKET_SCHEMA = pa.schema([pa.field("bucket", pa.string()), pa.field("key", pa.string()),
                           pa.field("phash", pa.int64())])
STEP_SCHEMA = pa.schema([pa.field("a", pa.string()), pa.field("b", pa.string()), pa.field("changed", pa.int8())])

_ID_AT, _UNIT_AT, _ROW_AT, _KEY_LEN = 25, 57, 81, 89


def node_key(width: int, height: int, fidelity: float, sharpness: float, rid: str, unit: str, row: int) -> str:
    """Sortable node name: smaller = better, so a group's minimum is its representative (the rule is documented
    in pipelines/curate_schema.py): most pixels, then the least lossy encoding (fidelity desc), then native
    sharpness desc, then id asc. Carries id/unit/row."""
    pixels = min(int(width) * int(height), (1 << 40) - 1)
    fid = min(1000, max(0, int(round(float(fidelity if fidelity is not None else 0.0) * 10))))
    sharp = float(sharpness) if sharpness is not None and np.isfinite(sharpness) else -100.0
    sh = min(10**8 - 1, max(0, int(round((sharp + 100.0) * 1e5))))
    key = f"{(1 << 40) - pixels:013d}{9999 - fid:04d}{10**8 - 1 - sh:08d}{rid}{unit}{int(row):08d}"
    if len(key) != _KEY_LEN:
        raise ValueError(f"unexpected id/unit length in node key {key!r}")
    return key


def key_id(key: str) -> str:
    return key[_ID_AT:_UNIT_AT]


def key_unit(key: str) -> str:
    return key[_UNIT_AT:_ROW_AT]


def key_row(key: str) -> int:
    return int(key[_ROW_AT:_KEY_LEN])


def add_node_keys(batch: pa.Table) -> pa.Table:
    keys = [node_key(w, h, f, s, i, u, r) for w, h, f, s, i, u, r in zip(
        batch["width"].to_pylist(), batch["height"].to_pylist(), batch["fidelity"].to_pylist(),
        batch["sharpness"].to_pylist(), batch["id"].to_pylist(), batch["unit"].to_pylist(),
        batch["row"].to_pylist())]
    return batch.append_column("key", pa.array(keys, pa.string()))


# ---------------------------------------------------------------- candidate buckets (one group-by)

def explode_buckets(batch: pa.Table, k: int) -> pa.Table:
    """Each row -> one exact bucket ("x:<pixel sha256>") and k+1 LSH buckets ("b<band>:<value>")."""
    ph = batch["phash"].to_numpy(zero_copy_only=False).astype(np.int64)
    keys = batch["key"].to_pylist()
    sha = batch["sha256"].to_pylist()
    bands = band_values(ph, k)  # [n, k+1]
    nb = bands.shape[1]
    names = []
    for i in range(len(keys)):
        names.append("x:" + sha[i])
        names.extend(f"b{b}:{int(v)}" for b, v in enumerate(bands[i]))
    return pa.table({"bucket": names, "key": np.repeat(np.asarray(keys, dtype=object), nb + 1).tolist(),
                     "phash": np.repeat(ph, nb + 1)}, schema=BUCKET_SCHEMA)


def bucket_edges(group: pa.Table, k: int, cap: int) -> pa.Table:
    """Edges of one bucket: exact buckets link every member to the best one; LSH buckets emit verified pairs
    (Hamming <= k) found through a second pigeonhole level inside the bucket (lsh.band_bucket_pairs); each
    member is compared with at most `cap` - 1 others sharing a sub-band, and runs over the cap are counted
    (one marker row with overflow = the members of such runs)."""
    n = group.num_rows
    if n < 2:
        return EDGE_SCHEMA.empty_table()
    keys = np.asarray(group["key"].to_pylist(), dtype=object)
    if group["bucket"][0].as_py().startswith("x:"):
        m = min(keys)
        others = sorted(set(keys.tolist()) - {m})
        return pa.table({"a": others, "b": [m] * len(others), "overflow": [0] * len(others)}, schema=EDGE_SCHEMA)
    ph = group["phash"].to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.argsort(keys, kind="stable")  # deterministic whatever order the shuffle delivered
    keys, ph = keys[order], ph[order]
    band = int(group["bucket"][0].as_py()[1:].split(":", 1)[0])
    i, j, overflow = band_bucket_pairs(ph, k, band, cap)
    a = keys[i].tolist()
    b = keys[j].tolist()
    if overflow:
        a.append(None)
        b.append(None)
    ov = [0] * len(i) + ([overflow] if overflow else [])
    return pa.table({"a": a, "b": b, "overflow": ov}, schema=EDGE_SCHEMA)


# ---------------------------------------------------------------- connected components (large/small star)

def _both_directions(batch: pa.Table) -> pa.Table:
    a, b = batch["a"], batch["b"]
    return pa.table({"node": pa.concat_arrays([_arr(a), _arr(b)]), "nb": pa.concat_arrays([_arr(b), _arr(a)])})


def _arr(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _oriented(batch: pa.Table) -> pa.Table:
    a, b = _arr(batch["a"]), _arr(batch["b"])
    a_big = pc.greater(a, b)
    return pa.table({"node": pc.if_else(a_big, a, b), "nb": pc.if_else(a_big, b, a)})


def _large_star(group: pa.Table) -> pa.Table:
    """Link every larger neighbour of u to min(N(u) + u); 'changed' when u was not that minimum."""
    u = group["node"][0].as_py()
    nbs = set(group["nb"].to_pylist())
    m = min(nbs | {u})
    out = sorted(v for v in nbs if v > u)
    flag = int(m != u)
    return pa.table({"a": out, "b": [m] * len(out), "changed": [flag] * len(out)}, schema=STEP_SCHEMA)


def _small_star(group: pa.Table) -> pa.Table:
    """Link u and its smaller neighbours to their minimum; 'changed' when u had more than one."""
    u = group["node"][0].as_py()
    nbs = set(group["nb"].to_pylist())  # all < u by orientation
    m = min(nbs | {u})
    out = sorted(v for v in (nbs | {u}) if v != m)
    flag = int(len(nbs) > 1)
    return pa.table({"a": out, "b": [m] * len(out), "changed": [flag] * len(out)}, schema=STEP_SCHEMA)


def connected_components(edges, sums, num_partitions: int = 1, max_rounds: int = 64, log=print):
    """Edges (a, b) -> star edges (a = member, b = component minimum), as Ray Datasets; stays distributed.

    A round is large-star then small-star; a round in which neither step changed anything leaves a star
    forest (every node either a centre with only larger neighbours or a leaf with exactly one centre).
    `sums(materialized_ds, columns)` adds up the change flags where the blocks live.
    """
    for rnd in range(1, max_rounds + 1):
        large = (edges.map_batches(_both_directions, batch_format="pyarrow")
                 .groupby("node", num_partitions=num_partitions)
                 .map_groups(_large_star, batch_format="pyarrow")).materialize()
        small = (large.map_batches(_oriented, batch_format="pyarrow")
                 .groupby("node", num_partitions=num_partitions)
                 .map_groups(_small_star, batch_format="pyarrow")).materialize()
        changed = sums(large, ["changed"])["changed"] + sums(small, ["changed"])["changed"]
        log(f"[curate] connected components round {rnd}: {small.count()} edges, {changed} changed")
        edges = small.select_columns(["a", "b"])
        if not changed:
            return edges
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
