"""Exact and near-duplicate detection on Ray as vectorised partition passes, plus connected components.

Every stage-1 "ok" row becomes a graph node named by a sortable key whose lexicographic minimum is the best
member of any group (`node_key`: the representative rule lives there and only there: most native pixels counted at
the steps of the enlargement estimate, an estimated enlargement discounted, then the least lossy encoding, then the
earliest input position). The search is the one of lsh.py, split over Ray tasks:
  1. hash-partition the rows by pHash (one map task per block, one reduce task per partition); each partition
     sorts its rows by (pHash, key) with numpy/pyarrow and emits one node per distinct pHash (its best key and
     row count) and star edges from every other row of that pHash to it. Rows with the same pixel sha256 have
     the same pHash (both come from the same decoded pixels), so these stars also cover the exact duplicates.
  2. near search: the tables of lsh.plan_tables (chosen from the number of distinct pHashes) are split over
     tasks; each task reads the distinct pHashes (8 bytes each, from the node blocks, not via the driver) and
     returns the verified pairs (pHash a, pHash b) within distance k, plus the overflow counts.
  3. two sort-merge passes (partition the pairs by pHash a, then by b) replace each pHash by its node key.
  4. connected components: below `local_max_edges` edges one Ray task gathers the edges and runs
     scipy.sparse.csgraph (faster than any shuffle at that size); above it, the large-star / small-star
     iteration (Kiveris et al., "Connected Components in MapReduce and Beyond", 2014), each step one
     hash-partition pass whose reduce side is vectorised pyarrow (group-by min, join), never a call per node.
No per-group Python call anywhere; only counters and object references reach the driver.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobkit.memprobe import probe
from pipelines.curation.lsh import block_value, near_forest, plan_tables, split_groups

STAR_SCHEMA = pa.schema([pa.field("a", pa.string()), pa.field("b", pa.string())])
NODE_SCHEMA = pa.schema([pa.field("phash", pa.int64()), pa.field("key", pa.string()),
                         pa.field("count", pa.int64())])
HPAIR_SCHEMA = pa.schema([pa.field("ha", pa.int64()), pa.field("hb", pa.int64())])
STEP_SCHEMA = pa.schema([pa.field("a", pa.string()), pa.field("b", pa.string()), pa.field("changed", pa.int8())])

# key layout: rank pixels (13) | fidelity (4) | unit position (8) | row (8) | id (32) | unit (24) | row (8)
_ID_AT, _UNIT_AT, _ROW_AT, _KEY_LEN = 33, 65, 89, 97
_MIX = np.uint64(0x9E3779B97F4A7C15)

# Below this many edges the components are computed in one Ray task (scipy.sparse.csgraph; components_peak_bytes);
# measured faster than two shuffles per round below it (benchmarks/bench_scale.py).
LOCAL_MAX_EDGES = 500_000


# The representative rule ranks members by native pixels counted at the steps of SCALE_STEPS and discounted once
# more for an estimated enlargement: rank_pixels = pixels / Q^4, where Q is native_scale rounded down to SCALE_STEPS
# (Q = 1 below 1.75: a native or soft member is ranked by its pixel count). Then the encoding fidelity, then the input
# position. Measured on the 44 dev photos (benchmarks/bench_sharpness.py; numbers in docs/curation-quality.md):
#  - by native pixels alone (pixels / native_scale^2) an enlargement beats its source in about half the photos: the
#    estimate of an enlargement by k spreads over about 0.75k to 1.3k, and an enlarged copy has at best the native
#    pixels of its source. The second Q^2 makes a copy estimated at 2x (Q = 1.75) lose unless it has 9x the pixels;
#  - the estimate moves by a few per cent between copies of the same pixels (re-encodes, crops, reductions of a soft
#    photo). Counted at steps, such copies mostly tie on the rank and their pixel count and fidelity decide, as they
#    should; the first step (1.75) sits above the soft native photos (up to 1.7 but for three at 3.1-3.5).
SCALE_STEPS = (1.0, 1.75, 2.5, 3.5, 5.0, 7.0, 10.0, 14.0, 20.0, 28.0, 40.0, 56.0)
ENLARGED_PENALTY = 2.0


def native_pixels(width: int, height: int, native_scale: float) -> float:
    """Pixels the image would have at its native resolution: width x height / native_scale^2 (native_scale is
    stage 1's estimated enlargement factor, analysis.native_scale; 1.0 for a native image, missing counts as 1)."""
    return int(width) * int(height) / _scale(native_scale) ** 2


def _scale(native_scale) -> float:
    s = float(native_scale) if native_scale is not None and np.isfinite(native_scale) else 1.0
    return max(1.0, s)


def scale_step(native_scale: float) -> float:
    """The estimate rounded down to SCALE_STEPS."""
    s = _scale(native_scale)
    return max(x for x in SCALE_STEPS if x <= s + 1e-9)


def rank_pixels(width: int, height: int, native_scale: float) -> int:
    """What node_key ranks members by first: pixels / scale_step(native_scale)^(2 + ENLARGED_PENALTY)."""
    return int(int(width) * int(height) / scale_step(native_scale) ** (2 + ENLARGED_PENALTY))


def node_key(width: int, height: int, fidelity: float, native_scale: float, rid: str, unit: str, row: int,
             order: int = 0) -> str:
    """Sortable node name: smaller = better, so a group's minimum is its representative (the rule is documented
    in pipelines/curate_schema.py and docs/curation-quality.md): the most native pixels, counted at the steps of
    the enlargement estimate and with an enlarged copy discounted once more (rank_pixels; never raw pixels alone:
    an enlarged copy carries no more detail than its source), then the least lossy encoding (fidelity desc), then
    the earliest input position (`order`: the block's position in the plan, then `row` inside the block), so of
    byte-identical copies the first occurrence in the inputs is kept. Carries id/unit/row."""
    pixels = min(rank_pixels(width, height, native_scale), (1 << 40) - 1)
    fid = min(1000, max(0, int(round(float(fidelity if fidelity is not None else 0.0) * 10))))
    key = (f"{(1 << 40) - pixels:013d}{9999 - fid:04d}{min(int(order), 10**8 - 1):08d}{int(row):08d}"
           f"{rid}{unit}{int(row):08d}")
    if len(key) != _KEY_LEN:
        raise ValueError(f"unexpected id/unit length in node key {key!r}")
    return key


def key_fields(keys) -> dict[str, pa.ChunkedArray | pa.Array]:
    """The image id, block (unit) and row that node keys name, from an Arrow string array of keys (node_key)."""

    def part(start: int, stop: int):
        return pc.utf8_slice_codeunits(keys, start, stop)

    return {"id": part(_ID_AT, _UNIT_AT), "unit": part(_UNIT_AT, _ROW_AT),
            "row": pc.cast(part(_ROW_AT, _KEY_LEN), pa.int32())}


def add_node_keys(batch: pa.Table, unit_order: dict[str, int] | None = None) -> pa.Table:
    """Append the node key of every row. unit_order: block key -> its position in the input plan (the job passes
    it, so ties go to the earliest input); without it every block counts as position 0 (ties: row, then id)."""
    order = unit_order or {}
    keys = [node_key(w, h, f, s, i, u, r, order.get(u, 0)) for w, h, f, s, i, u, r in zip(
        batch["width"].to_pylist(), batch["height"].to_pylist(), batch["fidelity"].to_pylist(),
        batch["native_scale"].to_pylist(), batch["id"].to_pylist(), batch["unit"].to_pylist(),
        batch["row"].to_pylist())]
    return batch.append_column("key", pa.array(keys, pa.string()))


def _arr(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


# ---------------------------------------------------------------- partitioning (deterministic, vectorised)

def hash_part(values: np.ndarray, parts: int) -> np.ndarray:
    """Partition of int64 values (same function on every worker)."""
    if parts <= 1:
        return np.zeros(len(values), np.int64)
    u = np.asarray(values, dtype=np.int64).view(np.uint64)
    return (((u * _MIX) >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)


def string_part(col, parts: int) -> np.ndarray:
    """Partition of strings: a multiply-xor fold of their bytes (fixed-width keys: one pass over 8-byte words)."""
    arr = _arr(col)
    n = len(arr)
    if parts <= 1 or n == 0:
        return np.zeros(n, np.int64)
    arr = arr.cast(pa.large_string()) if arr.type != pa.large_string() else arr
    offs = np.frombuffer(arr.buffers()[1], np.int64, count=n + 1, offset=arr.offset * 8)
    lens = np.diff(offs)
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    if arr.null_count == 0 and (lens == lens[0]).all() and lens[0] >= 8:
        width = int(lens[0])
        rows = data[offs[0]:offs[-1]].reshape(n, width)
        words = np.ascontiguousarray(rows[:, :width // 8 * 8]).view(np.uint64)
        h = np.full(n, np.uint64(1469598103934665603))
        for c in range(words.shape[1]):
            h = (h ^ words[:, c]) * _MIX
        if width % 8:
            tail = np.zeros((n, 8), np.uint8)
            tail[:, :width % 8] = rows[:, width // 8 * 8:]
            h = (h ^ tail.view(np.uint64)[:, 0]) * _MIX
    else:  # rare: variable-length or null strings
        import zlib
        h = np.asarray([zlib.crc32((s or "").encode()) for s in arr.to_pylist()], np.uint64) * _MIX
    return ((h >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)


def split_by(table: pa.Table, part: np.ndarray, parts: int) -> list[pa.Table]:
    """The rows of `table` in `parts` pieces by partition number (one stable sort, then slices). Partition
    numbers under 2^16 are sorted as uint16: numpy's stable sort is then a radix sort (8-18x faster on 1M rows)."""
    part = part.astype(np.uint16) if parts <= 1 << 16 else part
    order = np.argsort(part, kind="stable")
    t = table.take(pa.array(order))
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    return [t.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p])) for p in range(parts)]


# ---------------------------------------------------------------- step 1: identical pHashes (one partition)

def identical_groups(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Rows (key, phash) of one partition -> (nodes: one per distinct pHash with its best key and row count,
    star edges: every other row of a pHash -> that best key)."""
    if rows.num_rows == 0:
        return NODE_SCHEMA.empty_table(), STAR_SCHEMA.empty_table()
    rows = rows.select(["phash", "key"])
    t = rows.take(pc.sort_indices(rows, sort_keys=[("phash", "ascending"), ("key", "ascending")]))
    ph = _arr(t["phash"]).to_numpy(zero_copy_only=False)
    first = np.concatenate([[True], ph[1:] != ph[:-1]])
    starts = np.flatnonzero(first)
    counts = np.diff(np.concatenate([starts, [len(ph)]]))
    keys = _arr(t["key"])
    best = keys.take(pa.array(starts))
    nodes = pa.table({"phash": ph[starts], "key": best, "count": counts}, schema=NODE_SCHEMA)
    group = np.cumsum(first) - 1
    dup = np.flatnonzero(~first)
    stars = pa.table({"a": keys.take(pa.array(dup)), "b": best.take(pa.array(group[dup]))}, schema=STAR_SCHEMA)
    return nodes, stars


# ---------------------------------------------------------------- step 2: near pairs of distinct pHashes

def lookup_keys(pairs: pa.Table, nodes: pa.Table, col: str, out: str) -> pa.Table:
    """Replace the pHash column `col` of `pairs` by the node key of that pHash (all of them are in `nodes`)."""
    if pairs.num_rows == 0:
        return pairs.drop_columns([col]).append_column(out, pa.array([], pa.string()))
    nodes = nodes.take(pc.sort_indices(nodes, sort_keys=[("phash", "ascending")]))
    ph = _arr(nodes["phash"]).to_numpy(zero_copy_only=False)
    want = _arr(pairs[col]).to_numpy(zero_copy_only=False)
    pos = np.searchsorted(ph, want)
    if (pos >= len(ph)).any() or (ph[np.minimum(pos, len(ph) - 1)] != want).any():
        raise RuntimeError("near-duplicate pair names a pHash that no node partition holds")
    return pairs.drop_columns([col]).append_column(out, _arr(nodes["key"]).take(pa.array(pos)))


# ---------------------------------------------------------------- connected components

def both_directions(edges: pa.Table) -> pa.Table:
    a, b = _arr(edges["a"]), _arr(edges["b"])
    return pa.table({"node": pa.concat_arrays([a, b]), "nb": pa.concat_arrays([b, a])})


def oriented(edges: pa.Table) -> pa.Table:
    a, b = _arr(edges["a"]), _arr(edges["b"])
    a_big = pc.greater(a, b)
    return pa.table({"node": pc.if_else(a_big, a, b), "nb": pc.if_else(a_big, b, a)})


def _distinct(t: pa.Table, cols: list[str]) -> pa.Table:
    return t.group_by(cols, use_threads=False).aggregate([]).select(cols) if t.num_rows else t.select(cols)


def large_star(rows: pa.Table) -> pa.Table:
    """All (node, nb) rows of some nodes -> link every larger neighbour v of u to m = min(N(u) + u).
    'changed' is 1 on the output rows of a node u that is not its own m."""
    rows = _distinct(rows, ["node", "nb"])
    if rows.num_rows == 0:
        return STEP_SCHEMA.empty_table()
    g = rows.group_by("node", use_threads=False).aggregate([("nb", "min")])
    m = pc.min_element_wise(_arr(g["nb_min"]), _arr(g["node"]))
    g = pa.table({"node": g["node"], "m": m})
    j = rows.filter(pc.greater(rows["nb"], rows["node"])).join(g, "node", use_threads=False)
    changed = pc.cast(pc.not_equal(j["m"], j["node"]), pa.int8())
    return pa.table({"a": _arr(j["nb"]), "b": _arr(j["m"]), "changed": _arr(changed)}, schema=STEP_SCHEMA)


def small_star(rows: pa.Table) -> pa.Table:
    """Oriented (node > nb) rows of some nodes -> link u and its smaller neighbours to their minimum m;
    'changed' is 1 on the rows of a node that had more than one smaller neighbour."""
    rows = _distinct(rows, ["node", "nb"])
    if rows.num_rows == 0:
        return STEP_SCHEMA.empty_table()
    g = rows.group_by("node", use_threads=False).aggregate([("nb", "min"), ("nb", "count")])
    flag = pc.cast(pc.greater(g["nb_count"], 1), pa.int8())
    g = pa.table({"node": g["node"], "m": g["nb_min"], "flag": flag})
    j = rows.join(g, "node", use_threads=False)
    nb_rows = j.filter(pc.not_equal(j["nb"], j["m"]))
    a = pa.concat_arrays([_arr(nb_rows["nb"]), _arr(g["node"])])
    b = pa.concat_arrays([_arr(nb_rows["m"]), _arr(g["m"])])
    ch = pa.concat_arrays([_arr(nb_rows["flag"]), _arr(g["flag"])])
    return pa.table({"a": a, "b": b, "changed": ch}, schema=STEP_SCHEMA)


def local_components(edges: pa.Table) -> pa.Table:
    """Edges (a, b) -> star edges (member, component minimum) for every non-minimum node (scipy csgraph)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if edges.num_rows == 0:
        return STAR_SCHEMA.empty_table()
    allk = pa.concat_arrays([_arr(edges["a"]), _arr(edges["b"])])
    enc = allk.dictionary_encode()
    names = enc.dictionary
    order = pc.sort_indices(names).to_numpy()
    rank = np.empty(len(names), np.int64)
    rank[order] = np.arange(len(names))
    ids = rank[enc.indices.to_numpy(zero_copy_only=False)]  # integer order = string order
    n_e = edges.num_rows
    g = coo_matrix((np.ones(n_e, np.int32), (ids[:n_e], ids[n_e:])), shape=(len(names), len(names)))
    _, label = connected_components(g, directed=False)
    root = np.full(label.max() + 1, len(names), np.int64)
    np.minimum.at(root, label, np.arange(len(names)))
    r = root[label]
    member = np.flatnonzero(r != np.arange(len(names)))
    sorted_names = names.take(pa.array(order))
    return pa.table({"a": sorted_names.take(pa.array(member)), "b": sorted_names.take(pa.array(r[member]))},
                    schema=STAR_SCHEMA)


# ---------------------------------------------------------------- memory bounds (each declared to Ray as `memory=`)
# What one task of each kind holds at its peak, from the bytes it is given (a partition, a map group, a search
# task's hashes): never the corpus. The formulas are the reservations the tasks make (`_reserve`), the numbers
# `vosr plan` prints, and what benchmarks/bench_memory.py checks against measured peaks.

SHUFFLE_PIECE_BYTES = 512 * 2**10
"""Bytes a map task aims to put in each piece. Ray keeps a task's return values under ~100 KiB in the *caller's*
heap (here the driver's); pieces 5x that size go to the object store, and only their references (~3 KiB each,
measured) stay on the driver. Map tasks therefore take as many input blocks as needed for pieces this big."""
TASK_MARGIN_BYTES = 48 * 2**20  # transient buffers and allocator slack of one task, beyond its data
KEY_BYTES = _KEY_LEN + 4  # one node key in an Arrow string column: its characters and its offset
ROW_BYTES = {
    "key_phash": KEY_BYTES + 8,  # step 1's map input: key, phash
    "node": 8 + KEY_BYTES + 8,  # NODE_SCHEMA
    "hash": 16,  # what the search reads of a node: phash, count
    "hpair": 16,  # HPAIR_SCHEMA
    "half": 8 + KEY_BYTES,  # (hb, ka) after the first lookup
    "star": 2 * KEY_BYTES,  # STAR_SCHEMA
    "step": 2 * KEY_BYTES + 1,  # STEP_SCHEMA
}
SEARCH_BYTES_PER_HASH = 160
"""A search task's peak per distinct hash it is given: the hashes and counts (16 B) read in place and
concatenated (16 B), the union-find forest (8 B), the cache-size split (order, part and the reordered values and
counts: 32 B) and one table's sort (packed words, index, key-equality flags: 17 B), with slack for numpy's
temporaries. Measured: 91 B per hash for a task given 1M hashes (benchmarks/bench_memory.py --section search
prints each task's growth)."""
SEARCH_TASK_HASHES = 1 << 22  # default of curate.dedup.search_task_hashes: ~370 MB measured, 688 MiB bound
SPLIT_BINS_PER_TASK = 4  # split-block values per search task at least: enough to deal them evenly, few groups
COMPONENTS_EDGE_BYTES = 1024
"""The one-task components' peak per edge: the edges fetched (186 B) and concatenated (186 B), their keys
dictionary-encoded and sorted, scipy's arrays (measured 360-790 B per edge above the edges themselves at 400k /
100k edges: dedup.local_components)."""


def shuffle_map_peak_bytes(in_bytes: int) -> int:
    """One map task of a hash-partition pass, given `in_bytes` of rows (after its prep): the prepared rows, the
    same rows in partition order, and the pieces written to the object store (3 x in_bytes), plus the margin.
    Its input blocks are read in place from the object store (only the columns the prep selects are touched)."""
    return 3 * int(in_bytes) + TASK_MARGIN_BYTES


def partition_peak_bytes(in_bytes: int) -> int:
    """One reduce task over one partition of `in_bytes` (its pieces, plus the node partition a lookup joins):
    the pieces read in place, their concatenation, one sorted or joined copy, and the outputs (4 x in_bytes),
    plus the margin."""
    return 4 * int(in_bytes) + TASK_MARGIN_BYTES


def search_task_peak_bytes(hashes: int) -> int:
    """One near-duplicate search task given `hashes` distinct hashes (at most curate.dedup.search_task_hashes,
    unless one histogram bin alone holds more: near_search)."""
    return SEARCH_BYTES_PER_HASH * int(hashes) + TASK_MARGIN_BYTES


REF_BYTES = 3 * 2**10  # what the driver holds per object it owns in the object store (measured: ~2.9 KiB)


def shuffle_pieces(total_bytes: int, parts: int) -> int:
    """Pieces of one hash-partition pass over total_bytes: one map task per parts x SHUFFLE_PIECE_BYTES of input
    (at least one), each returning `parts` pieces."""
    return max(1, -(-int(total_bytes) // (parts * SHUFFLE_PIECE_BYTES))) * parts


def driver_peak_bytes(rows: int, parts: int) -> int:
    """What stage 2's dedup adds to the driver for `rows` rows: the references of the largest pass's pieces
    (step 1, key + pHash per row; REF_BYTES each) and the pieces Ray may keep in the driver's heap when a whole
    pass is smaller than one map task's worth (at most parts x SHUFFLE_PIECE_BYTES). Grows with the corpus only
    through the references: ~0.6% of the bytes shuffled, about 0.6 B per row."""
    pieces = shuffle_pieces(int(rows) * ROW_BYTES["key_phash"], parts)
    return REF_BYTES * pieces + parts * SHUFFLE_PIECE_BYTES


def components_peak_bytes(edges: int) -> int:
    """The one-task connected components over `edges` edges (at most curate.dedup.local_max_edges)."""
    return COMPONENTS_EDGE_BYTES * int(edges) + TASK_MARGIN_BYTES


def search_plan(n: int, k: int, task_hashes: int, search_tasks: int = 1):
    """How the search over n distinct hashes is cut: (tables, groups). Each group is (split blocks, its tables):
    every table of a group contains the group's split blocks, so two hashes sharing a key of one of its tables
    have equal split-block bits, and the hashes can be cut by those bits into tasks of about `task_hashes`
    (2^bits >= SPLIT_BINS_PER_TASK bins per task; the fewer split blocks, the fewer groups, each one pass over
    the hashes). With n <= task_hashes there is no split: the tables are
    dealt over `search_tasks` tasks that each read all n hashes."""
    tables = plan_tables(k, n)
    n_tasks = -(-n // max(1, task_hashes))
    if not tables:
        return tables, []
    if n_tasks <= 1:
        m = max(1, min(search_tasks, len(tables)))
        return tables, [((), list(tables[t::m])) for t in range(m)]
    return tables, split_groups(tables, n, max(1, n // (SPLIT_BINS_PER_TASK * n_tasks)))


def hist_bits(split, n: int, task_hashes: int) -> int:
    """Bits of the split-block value kept for the histogram that deals the bins to tasks (at least
    SPLIT_BINS_PER_TASK bins per task; more when the split blocks have the bits, at most 2^16 bins)."""
    bits = sum(w for _, w in split)
    want = max(1, math.ceil(math.log2(16 * max(1, -(-n // max(1, task_hashes))))))
    return min(bits, want, 16)


def deal_bins(hist: np.ndarray, task_hashes: int) -> np.ndarray:
    """Task number of each histogram bin: consecutive bins, each task at most task_hashes hashes unless one bin
    alone holds more (it then has a task of its own)."""
    task = np.zeros(len(hist), np.int64)
    t = acc = 0
    for b, h in enumerate(hist.tolist()):
        if acc and acc + h > task_hashes:
            t += 1
            acc = 0
        task[b] = t
        acc += h
    return task


# ---------------------------------------------------------------- Ray orchestration

_REMOTES: dict = {}
_NODE_CAPS = [0.0, 0, 0.0]  # (when read, the largest alive node's memory resource, its most CPUs)


def _remote(fn):
    import ray

    r = _REMOTES.get(fn)
    if r is None:
        r = _REMOTES[fn] = ray.remote(fn)
    return r


def node_caps(fresh: bool = False) -> tuple[int, float]:
    """(largest memory resource, most CPUs) of an alive node (read at most every 5 s, or now when `fresh`: a
    request sized from a node that has since been lost would wait forever as infeasible)."""
    import ray

    now = time.monotonic()
    if fresh or now - _NODE_CAPS[0] > 5:
        alive = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        _NODE_CAPS[:] = [now, int(max((r.get("memory", 0) for r in alive), default=0)),
                         float(max((r.get("CPU", 0) for r in alive), default=0))]
    return _NODE_CAPS[1], _NODE_CAPS[2]


def _reserve(nbytes: int) -> dict:
    """Ray options reserving `nbytes` of memory, capped at the largest node's memory resource so the task can
    always be placed (the bound is then a warning sign for `vosr plan`, not a hang)."""
    if nbytes <= 0:
        return {}
    cap = node_caps()[0]
    return {"memory": int(min(nbytes, cap))} if cap else {}


def block_task_memory(factor: int = 3) -> dict:
    """Ray options for a Ray Data task over one block: `factor` x the block size Ray Data cuts to
    (DataContext.target_max_block_size, 128 MiB by default: the input, its output and one transient copy),
    plus TASK_MARGIN_BYTES."""
    import ray.data

    block = ray.data.DataContext.get_current().target_max_block_size or 128 * 2**20
    return _reserve(factor * int(block) + TASK_MARGIN_BYTES)


def _submit(fn, args, num_returns: int = 1, memory: int = 0, **opts):
    return _remote(fn).options(num_returns=num_returns, **_reserve(memory), **opts).remote(*args)


def _concat(pieces) -> pa.Table:
    pieces = [p for p in pieces if p.num_rows] or pieces[:1]
    return pa.concat_tables(pieces, promote_options="default") if len(pieces) > 1 else pieces[0]


def _key_phash(block: pa.Table) -> pa.Table:
    t = block.select(["key", "phash"])
    return t.filter(pc.is_valid(t["phash"])) if t["phash"].null_count else t


@probe("shuffle_map")
def _split_task(prep, key: str, parts: int, kind: str, *blocks):
    t = _concat([prep(b) if prep is not None else b for b in blocks])
    part = hash_part(_arr(t[key]).to_numpy(zero_copy_only=False), parts) if kind == "int" \
        else string_part(t[key], parts)
    pieces = split_by(t, part, parts)
    return (*pieces, np.array([p.num_rows for p in pieces], np.int64))


def map_groups(sizes, parts: int, piece_bytes: int = SHUFFLE_PIECE_BYTES) -> list[list[int]]:
    """Consecutive inputs gathered into map tasks holding about parts x piece_bytes each (an input larger than
    that is a group of its own; a short tail joins the last group), so the pieces average piece_bytes and stay
    out of the driver's heap whatever the block size. Below parts x piece_bytes in all there is one group and
    its pieces may be small: at most that many bytes then reach the driver."""
    target = max(1, parts * piece_bytes)
    groups, cur, acc = [], [], 0
    for i, s in enumerate(sizes):
        cur.append(i)
        acc += int(s)
        if acc >= target:
            groups.append(cur)
            cur, acc = [], 0
    if cur:
        if groups and acc < target // 2:
            groups[-1].extend(cur)
        else:
            groups.append(cur)
    return groups


def hash_shuffle(refs, prep, key: str, parts: int, kind: str, sizes):
    """Map side of a hash-partition pass: (per partition, the piece references; rows per partition).
    `sizes`: the bytes of each input after `prep` (estimates are enough: they only group the inputs)."""
    import ray

    outs = []
    for g in map_groups(sizes, parts):
        outs.append(_submit(_split_task, (prep, key, parts, kind, *[refs[i] for i in g]), num_returns=parts + 1,
                            memory=shuffle_map_peak_bytes(sum(int(sizes[i]) for i in g))))
    rows = np.zeros(parts, np.int64)
    for c in ray.get([o[-1] for o in outs]):
        rows += c
    return [[o[p] for o in outs] for p in range(parts)], rows


def _size_task(block: pa.Table) -> tuple[int, int]:
    return block.num_rows, block.nbytes


def block_sizes(refs) -> list[tuple[int, int]]:
    """(rows, bytes) of each block (one small task per block, where the block is: only integers reach the
    driver)."""
    import ray

    task = _remote(_size_task).options(num_cpus=0.1)
    return ray.get([task.remote(r) for r in refs])


@probe("dedup_groups")
def _groups_task(*pieces):
    nodes, stars = identical_groups(_concat(list(pieces)))
    return nodes, stars, (nodes.num_rows, stars.num_rows)


def _hashes(blocks) -> tuple[np.ndarray, np.ndarray]:
    ph = np.concatenate([_arr(b["phash"]).to_numpy(zero_copy_only=False) for b in blocks])
    cnt = np.concatenate([_arr(b["count"]).to_numpy(zero_copy_only=False) for b in blocks])
    return ph, cnt


@probe("search_hist")
def _hist_task(specs, *blocks):
    """Histograms of the split-block values (top bits) of the hashes in `blocks`, one per group."""
    u = np.concatenate([_arr(b["phash"]).to_numpy(zero_copy_only=False) for b in blocks]).view(np.uint64)
    return [np.bincount(block_value(u, split) >> shift, minlength=bins) for split, shift, bins in specs]


@probe("search_split")
def _search_split_task(split, shift: int, bin_task: np.ndarray, n_tasks: int, *blocks):
    ph, cnt = _hashes(blocks)
    t = pa.table({"phash": ph, "count": cnt})
    task = bin_task[block_value(ph.view(np.uint64), split) >> shift]
    pieces = split_by(t, task, n_tasks)
    return (*pieces, np.array([p.num_rows for p in pieces], np.int64))


@probe("search")
def _search_task(k: int, cap: int, tables, *blocks):
    """Near pairs of the given hashes under the given tables, as a spanning forest of pHash pairs
    (lsh.near_forest): at most one edge per hash, in memory bounded by the hashes given."""
    ph, cnt = _hashes(blocks)
    u = ph.view(np.uint64)
    i, j, info = near_forest(u, k, cap, cnt, tables=tables)
    pairs = pa.table({"ha": ph[i], "hb": ph[j]}, schema=HPAIR_SCHEMA)
    return pairs, {**info, "edges": pairs.num_rows, "hashes": len(ph)}


def near_search(node_refs, node_rows, k: int, cap: int, search_tasks: int, task_hashes: int = SEARCH_TASK_HASHES):
    """Step 2 on Ray: (pHash-pair block refs, rows of each, overflow counters, plan summary). Every task reads
    only its own hashes: with more than `task_hashes` distinct hashes the tables are grouped by shared key blocks
    (search_plan) and, per group, the hashes are dealt to tasks by those blocks' bits (a histogram pass, then one
    hash-partition pass per group); each task holds at most task_hashes hashes unless a single histogram bin
    alone is larger (a huge run of near-copies can be: its task then reserves its actual size)."""
    import ray

    n = int(sum(node_rows))
    tables, groups = search_plan(n, k, task_hashes, search_tasks)
    overflow = {"buckets": 0, "rows": 0, "pairs": 0}
    plan = {"tables": len(tables), "groups": 0, "tasks": 0, "most_hashes": 0}
    if not tables or n < 2:
        return [], [], overflow, plan
    work = []  # (tables, input refs, hashes)
    if len(groups) and not groups[0][0]:  # no split: every task reads every hash (n <= task_hashes)
        work = [(tabs, list(node_refs), n) for _, tabs in groups]
    else:
        sizes = [r * ROW_BYTES["hash"] for r in node_rows]
        specs = []
        for split, _ in groups:
            hb = hist_bits(split, n, task_hashes)
            specs.append((split, sum(w for _, w in split) - hb, 1 << hb))
        hists = [np.zeros(b, np.int64) for _, _, b in specs]
        for g in map_groups(sizes, 1, 32 * 2**20):
            ref = _submit(_hist_task, (specs, *[node_refs[i] for i in g]),
                          memory=shuffle_map_peak_bytes(sum(sizes[i] for i in g)))
            for h, part in zip(hists, ray.get(ref)):
                h += part
        for (split, tabs), (_, shift, _), hist in zip(groups, specs, hists):
            bin_task = deal_bins(hist, task_hashes)
            n_tasks = int(bin_task[-1]) + 1
            bt_ref = ray.put(bin_task)  # once, not once per map task
            outs = [_submit(_search_split_task, (split, shift, bt_ref, n_tasks, *[node_refs[i] for i in mg]),
                            num_returns=n_tasks + 1, memory=shuffle_map_peak_bytes(sum(sizes[i] for i in mg)))
                    for mg in map_groups(sizes, n_tasks)]
            per_task = np.bincount(bin_task, weights=hist, minlength=n_tasks).astype(np.int64)
            work += [(tabs, [o[t] for o in outs], int(per_task[t])) for t in range(n_tasks) if per_task[t] > 1]
    res = [_submit(_search_task, (k, cap, tabs, *refs), num_returns=2, memory=search_task_peak_bytes(h))
           for tabs, refs, h in work]
    rows, given = [], []
    for info in ray.get([r[1] for r in res]):
        for key in overflow:
            overflow[key] += info[key]
        rows.append(info["edges"])
        given.append(info["hashes"])
    plan.update(groups=len(groups), tasks=len(work), most_hashes=max(given, default=0), hashes_per_task=given)
    return [r[0] for r in res], rows, overflow, plan


@probe("dedup_lookup")
def _dedupe_lookup_task(col: str, out: str, nodes: pa.Table, *pieces):
    pairs = _concat(list(pieces))
    if col == "ha":  # first pass: the same pair may come from several search tasks
        pairs = _distinct(pairs, ["ha", "hb"])
    res = lookup_keys(pairs, nodes, col, out)
    if col == "hb":  # second pass: the edge between the two node keys
        res = pa.table({"a": res["ka"], "b": res["kb"]}, schema=STAR_SCHEMA)
    return res, res.num_rows


@probe("dedup_star")
def _star_task(fn, *pieces):
    res = fn(_concat(list(pieces)))
    return res, (int(pc.sum(res["changed"]).as_py() or 0) if res.num_rows else 0, res.num_rows)


def _select_ab(t: pa.Table) -> pa.Table:
    return t.select(["a", "b"])


def _lookup_pass(refs, rows, col: str, out: str, row_bytes: int, node_refs, node_rows, parts: int):
    pieces, prow = hash_shuffle(refs, None, col, parts, "int", [r * row_bytes for r in rows])
    res = [_submit(_dedupe_lookup_task, (col, out, node_refs[p], *pieces[p]), num_returns=2,
                   memory=partition_peak_bytes(prow[p] * row_bytes + node_rows[p] * ROW_BYTES["node"]))
           for p in range(parts)]
    import ray

    return [r[0] for r in res], ray.get([r[1] for r in res])


@probe("components")
def _components_task(*edge_blocks) -> pa.Table:
    return local_components(_concat([b.select(["a", "b"]) for b in edge_blocks]))


def find_duplicates(block_refs, k: int, cap: int, parts: int, search_tasks: int,
                    local_max_edges: int = LOCAL_MAX_EDGES, max_rounds: int = 64, log=print,
                    task_hashes: int = SEARCH_TASK_HASHES, rows=None):
    """Row blocks (with "key" and "phash") -> (star-edge block refs: a = duplicate key, b = its
    representative's key; info dict). Runs as Ray tasks; only counters and object references come back to the
    driver. `rows`: rows of each block, if known."""
    import ray

    rows = [r for r, _ in block_sizes(block_refs)] if rows is None else rows
    # 1. identical pHashes
    kp = ROW_BYTES["key_phash"]
    pieces, prow = hash_shuffle(block_refs, _key_phash, "phash", parts, "int", [r * kp for r in rows])
    out = [_submit(_groups_task, tuple(pieces[p]), num_returns=3, memory=partition_peak_bytes(prow[p] * kp))
           for p in range(parts)]
    del pieces
    node_refs = [o[0] for o in out]
    star_refs = [o[1] for o in out]
    counts = ray.get([o[2] for o in out])
    node_rows = [c[0] for c in counts]
    star_rows = [c[1] for c in counts]
    n_distinct, n_star = sum(node_rows), sum(star_rows)
    # 2. near pairs of distinct pHashes: each task reads only its own hashes
    pair_refs, pair_rows, overflow, plan = near_search(node_refs, node_rows, k, cap, search_tasks, task_hashes)
    # 3. pHash pairs -> node-key pairs (two sort-merge passes against the node partitions)
    near_refs, near_rows = [], []
    if pair_refs:
        half, half_rows = _lookup_pass(pair_refs, pair_rows, "ha", "ka", ROW_BYTES["hpair"], node_refs, node_rows,
                                       parts)
        near_refs, near_rows = _lookup_pass(half, half_rows, "hb", "kb", ROW_BYTES["half"], node_refs, node_rows,
                                            parts)
    n_near = sum(near_rows)
    info = {"duplicate_edges": n_star + n_near, "bucket_overflow": {"buckets": overflow["buckets"],
                                                                     "rows": overflow["rows"]},
            "distinct_phash": n_distinct, "lsh_tables": plan["tables"], "search_tasks": plan["tasks"],
            "search_task_most_hashes": plan["most_hashes"]}
    log(f"[curate] dedup: {n_distinct} distinct pHashes, {plan['tables']} tables in {plan['tasks']} search tasks "
        f"(at most {plan['most_hashes']} hashes each), {n_star} identical-pHash + {n_near} near edges, overflow "
        f"{info['bucket_overflow']}")
    edge_refs, edge_rows = star_refs + near_refs, list(star_rows) + list(near_rows)
    if info["duplicate_edges"] == 0:
        return [], info
    # 4. components
    if info["duplicate_edges"] <= local_max_edges:  # one task: faster than the passes at this size
        info["components"] = "one task"
        return [_submit(_components_task, tuple(edge_refs),
                        memory=components_peak_bytes(info["duplicate_edges"]))], info
    info["components"] = "distributed"
    sb, tb = ROW_BYTES["star"], ROW_BYTES["step"]
    for rnd in range(1, max_rounds + 1):
        pieces, prow = hash_shuffle(edge_refs, both_directions, "node", parts, "string", [2 * r * sb for r in edge_rows])
        large = [_submit(_star_task, (large_star, *pieces[p]), num_returns=2, memory=partition_peak_bytes(prow[p] * sb))
                 for p in range(parts)]
        lc = ray.get([x[1] for x in large])
        pieces, prow = hash_shuffle([x[0] for x in large], oriented, "node", parts, "string", [c[1] * tb for c in lc])
        small = [_submit(_star_task, (small_star, *pieces[p]), num_returns=2, memory=partition_peak_bytes(prow[p] * tb))
                 for p in range(parts)]
        del pieces
        sc = ray.get([x[1] for x in small])
        changed = sum(c[0] for c in lc) + sum(c[0] for c in sc)
        edge_refs, edge_rows = [x[0] for x in small], [c[1] for c in sc]
        log(f"[curate] connected components round {rnd}: {changed} changed")
        if not changed:
            info["component_rounds"] = rnd
            return [_submit(_select_ab, (r,), memory=partition_peak_bytes(n * tb))
                    for r, n in zip(edge_refs, edge_rows)], info
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
