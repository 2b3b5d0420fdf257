"""Training data: feature shards (or the online dataset) -> held-out split -> per-worker batch streams.

Driver side: `training_datasets(cfg)` opens the materialised feature shards (after checking their metadata file
against the config, pipelines/features/schema.check_compatible) or builds the online dataset
(pipelines/features/online.py), and splits rows by a hash of their image id into train and held-out validation
(data.holdout_fraction; every variant of an image lands on the same side).
Mixing (train.mix_shards, docs/mixing.md): shards are written sorted by (id, variant), one per curated source unit,
so reading them in order gives one-source batches with an image's variants side by side. The training rows are
read as the shards' row groups in a seeded order that changes every epoch, a block drawing on MIX_GROUP_UNITS
shards with its rows spread by variant, then pass each worker's shuffle buffer of train.shuffle_buffer samples
(2000, as the reference's; spread_batches), which also keeps the K variants of an image out of one batch (a row
group, hence a block, holds all variants of its images, so a plain buffer would pair them far more often than
random sampling does). benchmarks/bench_mixing.py measures the result against random sampling; docs/mixing.md.
Worker side: `BatchStream` iterates the worker's streaming-split shard (`ray.train.get_dataset_shard`) epoch after
epoch with a per-(rank, epoch) buffer seed and counts its position (epoch, batch in epoch) for checkpoints;
a resumed stream skips the batches its epoch had already consumed (the same count of batches; with mixing the
skipped rows are those of the new execution's order, so a resumed epoch is complete in count, not row for row).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

_HASH_SPACE = 2**64


def is_holdout(sample_id: str, fraction: float) -> bool:
    """Whether an image id belongs to the held-out split (stable hash, independent of variant and order)."""
    h = hashlib.blake2b(b"vosr-holdout\x1f" + str(sample_id).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * _HASH_SPACE


def _holdout_mask(ids: pa.Array, fraction: float) -> np.ndarray:
    return np.fromiter((is_holdout(i, fraction) for i in ids.to_pylist()), dtype=bool, count=len(ids))


def _id_hash(ids: list[str], seed: int) -> np.ndarray:
    return np.fromiter((int.from_bytes(hashlib.blake2b(f"{seed}\x1f{i}".encode(), digest_size=8).digest(), "little")
                        for i in ids), dtype=np.uint64, count=len(ids))


def spread_order(table: pa.Table, seed: int) -> np.ndarray:
    """The row order of spread_variants (indices into `table`)."""
    if table.num_rows < 2 or "variant" not in table.column_names:
        return np.arange(table.num_rows)
    ids = table.column("id").to_pylist()
    variant = np.asarray(table.column("variant").to_numpy(zero_copy_only=False), dtype=np.int64)
    return np.lexsort((_id_hash(ids, seed), variant))


def spread_variants(table: pa.Table, seed: int) -> pa.Table:
    """Rows reordered by (variant, seeded hash of the image id): variant 0 of every image in a random order, then
    variant 1, ...; the K variants of an image end up about rows/K apart instead of next to each other (shards are
    written sorted by (id, variant)), and neighbouring rows come from different images and, in a mixed block,
    from different shards."""
    if table.num_rows < 2 or "variant" not in table.column_names:
        return table
    return table.take(pa.array(spread_order(table, seed)))


class _SplitFilter:
    """Ray Data batch function keeping the train (keep_holdout=False) or held-out rows of a pyarrow batch (a batch
    function, not `Dataset.filter(expr=...)`: the split is a blake2b hash of the id, which no expression computes)."""

    def __init__(self, fraction: float, keep_holdout: bool, first_variant_only: bool = False):
        self.fraction = fraction
        self.keep_holdout = keep_holdout
        self.first_variant_only = first_variant_only

    def __call__(self, table: pa.Table) -> pa.Table:
        mask = _holdout_mask(table.column("id").combine_chunks(), self.fraction)
        if not self.keep_holdout:
            mask = ~mask
        if self.first_variant_only and "variant" in table.column_names:
            mask &= np.asarray(table.column("variant").to_numpy(zero_copy_only=False)) == 0
        return table.filter(pa.array(mask))


MIX_GROUP_UNITS = 16  # units (row groups, or slices of large ones) from up to 16 shards per block
# A read task's memory (read_task_peak_bound): it decodes its units in record batches of 1/READ_BATCH_FRACTION of
# the block target (a Parquet row group of 16-bit fixed-size lists decodes at ~6-8x its Arrow bytes: INT32 pages
# plus definition and repetition levels per value, so never a whole large row group at once), holds the block's
# rows (<= the target), then hands out the variant-spread rows as blocks of 1/READ_OUT_FRACTION of the target,
# each gathered from its source batches (at most READ_OUT_COPIES copies of one output block at once).
READ_BATCH_FRACTION = 64
READ_OUT_FRACTION = 16
READ_OUT_COPIES = 2
READ_BUFFER_BYTES = 8 << 20  # buffered-stream reads (Ray Data's own Parquet reader uses 8 MiB too)
# Measured by benchmarks/bench_memory_reads.py --only training-read (peak RSS above the process's RSS before the
# read task, one task per fresh process, vosr-0.5b / 512 px rows): 157 / 309 / 663 MiB at targets of 128 / 256 /
# 512 MiB; the decode transient per byte of one record batch and the fixed part below cover them.
READ_DECODE_FACTOR = 8
READ_FIXED_BYTES = 64 << 20


def read_task_peak_bound(target_bytes: int, block_bytes: int | None = None) -> int:
    """Stated peak bytes of one training read task for a block target of `target_bytes` (train.read_block_mb)
    and a block of `block_bytes` (at most the target; default the target): the block's rows, READ_OUT_COPIES
    copies of one output block (1/READ_OUT_FRACTION of the target), the decode transient of one record batch
    (READ_DECODE_FACTOR x 1/READ_BATCH_FRACTION of the target) and a fixed part: 1.25 x the target + 64 MiB,
    under 2x the target for targets of 128 MiB and more. Declared to Ray as the read task's `memory`."""
    t = int(target_bytes)
    b = t if block_bytes is None else min(t, int(block_bytes))
    return (b + READ_OUT_COPIES * (t // READ_OUT_FRACTION) + READ_DECODE_FACTOR * (t // READ_BATCH_FRACTION)
            + READ_FIXED_BYTES)


def feature_row_bytes(schema: pa.Schema) -> int:
    """In-memory bytes of one feature row (the tensor columns plus a little per other column)."""
    from pipelines.features.writer import schema_row_bytes

    return max(1, schema_row_bytes(schema))


def read_layout(row_bytes: int, block_bytes: int, group: int = MIX_GROUP_UNITS) -> dict[str, int]:
    """How a read task cuts its work for rows of `row_bytes` and a block target of `block_bytes`: rows per decoded
    record batch, the most rows of one unit (a row group larger than that is read as several units, whole batches
    each), units per block (at most `group`), rows per output block."""
    batch = max(1, int(block_bytes) // READ_BATCH_FRACTION // row_bytes)
    unit = max(batch, (int(block_bytes) // row_bytes) // batch * batch)
    return {"batch_rows": batch, "unit_rows": unit, "out_rows": max(1, int(block_bytes) // READ_OUT_FRACTION
                                                                     // row_bytes), "block_rows": unit,
            "group": group}


def _row_group_units(paths: list[str], fs) -> tuple[list[tuple[int, int, int]], int, int]:
    """((file index, row group, rows) of every row group of the shards, in-memory bytes per row, total
    uncompressed bytes) from the footers only, 16 files at a time."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    def groups(p: str) -> tuple[list[int], int, int]:
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            rgs = [md.row_group(g) for g in range(md.num_row_groups)]
            return ([g.num_rows for g in rgs], feature_row_bytes(pf.schema_arrow),
                    sum(g.total_byte_size for g in rgs))

    with ThreadPoolExecutor(max_workers=16) as pool:
        per_file = list(pool.map(groups, paths))
    units = [(i, g, n) for i, (rows, _, _) in enumerate(per_file) for g, n in enumerate(rows)]
    return units, max((rb for _, rb, _ in per_file), default=1), sum(b for _, _, b in per_file)


def split_units(units: list[tuple[int, int, int]], unit_rows: int) -> list[tuple[int, int, int, int]]:
    """(file, row group, first row, rows): each row group cut into slices of at most `unit_rows` rows."""
    out = []
    for f, g, n in units:
        for start in range(0, max(n, 1), unit_rows):
            out.append((f, g, start, min(unit_rows, n - start)))
    return [u for u in out if u[3] > 0]


def mixed_unit_groups(unit_files, seed: int, epoch: int, group: int = MIX_GROUP_UNITS) -> list[np.ndarray]:
    """The epoch's read plan over units (row groups) whose shard indices are `unit_files`: each shard's units in
    a seeded random order, dealt round-robin over the shards (also in a seeded order), cut into groups of `group`
    (one read task each). A block thus holds units of `group` different shards when there are that many, and
    the order is new every epoch."""
    from vosr.seeding import derive_seed

    files = np.asarray(unit_files, dtype=np.int64)
    rng = np.random.default_rng(derive_seed(seed, "mix", epoch) % 2**63)
    n = len(files)
    by_shard = np.lexsort((rng.random(n), files))  # grouped by shard, random order inside each shard
    sorted_files = files[by_shard]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_files)) + 1] if n else np.zeros(0, dtype=np.int64)
    within = np.empty(n, dtype=np.int64)  # a unit's position in its shard's shuffled order
    within[by_shard] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    shard_rank = rng.permutation(int(files.max()) + 1 if n else 0)
    order = np.lexsort((shard_rank[files], within)) if n else np.zeros(0, dtype=np.int64)
    return [order[i:i + group] for i in range(0, n, group)]


def mixed_shards_datasource(uris: list[str], endpoint: str, seed: int, group: int = MIX_GROUP_UNITS,
                            block_bytes: int = 512 << 20, mix: bool = True):
    """A Ray Data datasource over the feature shards' row groups, re-planned at every execution (epoch).

    mix: a seeded shuffle of (shard, row group) units across all shards, read in tasks of up to `group` units
    whose rows are spread by variant (spread_variants) -- the training counterpart of the reference's resampled
    shards: every epoch visits every row once, in a new order, and no block holds one source only. Without mix:
    the units in shard order, rows as stored (validation's stable order).

    Memory: a read task holds at most `block_bytes` of rows (units per task = block_bytes / unit bytes, at most
    `group`; a row group larger than the target is read as slices), decodes in record batches and hands out
    blocks of 1/READ_OUT_FRACTION of it; its stated peak, read_task_peak_bound(block_bytes), is its Ray memory."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    from vosr import storage

    fs, _ = storage.open_fs(uris[0], endpoint)
    paths = [_fs_path(u) for u in uris]
    groups, row_bytes, size = _row_group_units(paths, fs)
    layout = read_layout(row_bytes, block_bytes, group)
    units = split_units(groups, layout["unit_rows"])
    per_task = max(1, min(group, layout["block_rows"] // max(1, max((u[3] for u in units), default=1))))

    class MixedShards(Datasource):
        def get_name(self) -> str:
            return "MixedShards" if mix else "FeatureShards"

        def estimate_inmemory_data_size(self):
            return size

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            epoch = data_context._execution_idx if data_context is not None else 0
            plan = (mixed_unit_groups([u[0] for u in units], seed, epoch, per_task) if mix else
                    [np.arange(i, min(i + per_task, len(units))) for i in range(0, len(units), per_task)])
            tasks = []
            for grp in plan:
                chosen = [units[int(k)] for k in grp]
                rows = sum(u[3] for u in chosen)
                meta = BlockMetadata(num_rows=rows, size_bytes=rows * row_bytes, exec_stats=None,
                                     input_files=tuple(sorted({uris[u[0]] for u in chosen})))
                spec = [(paths[u[0]], u[1], u[2], u[3]) for u in chosen]
                block_seed = derive_block_seed(seed, epoch, len(tasks)) if mix else None
                tasks.append(ReadTask(_read_units_fn(spec, uris[0], endpoint, block_seed, layout), meta))
            return tasks

    source = MixedShards()
    source.num_read_tasks = -(-len(units) // per_task)
    source.layout = layout
    source.row_bytes = row_bytes
    # reserve for the largest block the plan makes (small sets: far below the target)
    source.memory = read_task_peak_bound(block_bytes, per_task * max((u[3] for u in units), default=1) * row_bytes)
    return source


def read_mixed_shards(uris: list[str], endpoint: str, seed: int, group: int = MIX_GROUP_UNITS,
                      block_bytes: int = 512 << 20, mix: bool = True):
    """The Ray Dataset of mixed_shards_datasource, asking for exactly its read tasks (with fewer tasks than Ray's
    default minimum of blocks, 200, Ray would cut every task's output into many tiny blocks: 4 rows each for a
    4,096-row set, 5x slower to stream; benchmarks/bench_mixing.py), each reserving its stated peak as memory."""
    import ray.data

    source = mixed_shards_datasource(uris, endpoint, seed, group, block_bytes, mix)
    return ray.data.read_datasource(source, override_num_blocks=source.num_read_tasks, memory=source.memory)


def derive_block_seed(seed: int, epoch: int, index: int) -> int:
    from vosr.seeding import derive_seed

    return derive_seed(seed, "mix-block", epoch, index) % 2**63


def _fs_path(uri: str) -> str:
    from vosr import storage

    return storage.open_fs(uri)[1] if not uri.startswith("s3://") else uri[len("s3://"):]


def read_units(spec: list[tuple[str, int, int, int]], fs, batch_rows: int) -> list[pa.RecordBatch]:
    """The rows of units (path, row group, first row, rows) as record batches, decoded `batch_rows` at a time
    through a buffered stream (never a whole row group: its decode transient is several times its bytes). Unit
    starts are multiples of batch_rows (split_units), so a kept batch is never a slice of a larger one."""
    import pyarrow.parquet as pq

    batches = []
    for path, group, first, rows in spec:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
            pos = 0
            for b in pf.iter_batches(batch_size=batch_rows, row_groups=[group], use_threads=False):
                lo, hi = max(first, pos), min(first + rows, pos + b.num_rows)
                if hi > lo:
                    batches.append(b if (lo, hi) == (pos, pos + b.num_rows) else b.slice(lo - pos, hi - lo))
                pos += b.num_rows
                if pos >= first + rows:
                    break
    return batches


def gather_rows(batches: list[pa.RecordBatch], rows: np.ndarray) -> pa.Table:
    """The rows at positions `rows` of the batches taken end to end, in that order, copying only those rows: a
    take per source batch, one concatenation, then the reorder, each input released before the next copy (at
    most two copies of the result at once). Arrow's take on the many-chunk block would first concatenate each
    whole column: a copy of the block."""
    starts = np.cumsum([0] + [b.num_rows for b in batches])
    src = np.searchsorted(starts, rows, side="right") - 1
    pieces, where = [], []
    for b in np.unique(src):
        sel = np.flatnonzero(src == b)
        pieces.append(batches[b].take(pa.array(rows[sel] - starts[b])))
        where.append(sel)
    joined = pa.Table.from_batches(pieces).combine_chunks()
    del pieces
    return joined.take(pa.array(np.argsort(np.concatenate(where), kind="stable")))


def _read_units_fn(spec: list[tuple[str, int, int, int]], any_uri: str, endpoint: str, seed: int | None,
                   layout: dict[str, int]):
    def read():
        from vosr import storage

        fs, _ = storage.open_fs(any_uri, endpoint)
        batches = read_units(spec, fs, layout["batch_rows"])
        step = layout["out_rows"]
        if seed is None:  # stored order: the batches as they are, regrouped into output blocks
            table = pa.Table.from_batches(batches)
            for i in range(0, table.num_rows, step):
                yield table.slice(i, step)
            return
        names = [c for c in ("id", "variant") if c in batches[0].schema.names]
        keys = pa.Table.from_batches([b.select(names) for b in batches])
        order = spread_order(keys, seed)
        for i in range(0, len(order), step):  # blocks of 1/READ_OUT_FRACTION of the target, gathered one by one
            yield gather_rows(batches, order[i:i + step])

    return read


def mix_tables(tables: list[pa.Table], seed: int, rows_per_unit: int = 64,
               group: int = MIX_GROUP_UNITS) -> list[pa.Table]:
    """The in-memory (train.cache_data) counterpart of mixed_shards_datasource, planned once: the tables cut into
    `rows_per_unit` slices, shuffled across tables and regrouped `group` slices a block, rows spread by variant."""
    units, files = [], []
    for f, t in enumerate(tables):
        for i in range(0, t.num_rows, rows_per_unit):
            units.append(t.slice(i, rows_per_unit))
            files.append(f)
    out = []
    for k, grp in enumerate(mixed_unit_groups(files, seed, 0, group)):
        out.append(spread_variants(pa.concat_tables([units[int(i)] for i in grp]), derive_block_seed(seed, 0, k)))
    return out


def open_features(cfg: Any, mix: bool = False):
    """The full row dataset: materialised feature shards (metadata checked) or the online pipeline.

    With train.cache_data the shards are read once on the driver with pyarrow and handed to Ray Data as
    in-memory tables (small sets: no read tasks, no re-reads per epoch); otherwise Ray Data streams them.
    mix (train.mix_shards, training rows): the shards' row groups in a seeded order, new every epoch, a block
    drawing on many shards (mixed_shards_datasource; cached: mix_tables, planned once)."""
    tc = cfg.train
    if tc.online:  # reads the curated shards of precompute.input and encodes on the fly
        from pipelines.features.online import online_dataset, online_metadata

        return online_dataset(cfg), {"mode": "online", "metadata": online_metadata(cfg)}
    from pipelines.features.schema import check_compatible, read_metadata
    from pipelines.features.writer import shard_files
    from vosr import storage

    meta = read_metadata(tc.features, tc.s3_endpoint_url)
    check_compatible(meta, cfg)
    files = shard_files(tc.features, tc.s3_endpoint_url)  # shards/ only: never a running precompute's _parts/
    if not files:
        raise FileNotFoundError(f"no feature shards (shards/*.parquet) under {tc.features}")
    info = {"mode": "features", "shards": len(files), "metadata": meta}
    if tc.cache_data:
        import pyarrow.parquet as pq

        fs, _ = storage.open_fs(tc.features, tc.s3_endpoint_url)
        tables = [pq.read_table(_fs_path(f), filesystem=fs) for f in files]
        return tables, info
    # both orders read through the same bounded read tasks (train.read_block_mb); validation's is the stored one
    return read_mixed_shards(files, tc.s3_endpoint_url, cfg.run.seed, block_bytes=tc.read_block_mb << 20,
                             mix=mix), info


def training_datasets(cfg: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(train dataset, held-out dataset (first variant of each held-out image), info)."""
    import ray.data

    frac = cfg.data.holdout_fraction
    keep_train = _SplitFilter(frac, keep_holdout=False)
    keep_val = _SplitFilter(frac, keep_holdout=True, first_variant_only=True)
    if cfg.train.online:  # split the curated images before they are decoded, degraded and encoded
        from pipelines.features.online import online_dataset, online_metadata

        info = {"mode": "online", "metadata": online_metadata(cfg)}
        return (online_dataset(cfg, keep_rows=keep_train), online_dataset(cfg, variants=[0], keep_rows=keep_val),
                info)
    mix = cfg.train.mix_shards
    data, info = open_features(cfg)
    if isinstance(data, list):  # cached: split on the driver, hand over in-memory tables
        train_tables = [t for t in (keep_train(x) for x in data) if t.num_rows]
        if mix and train_tables:
            train_tables = mix_tables(train_tables, cfg.run.seed, cfg.precompute.rows_per_shard)
        val_tables = [t for t in (keep_val(x) for x in data) if t.num_rows]
        info["train_rows"] = sum(t.num_rows for t in train_tables)
        info["val_rows"] = sum(t.num_rows for t in val_tables)
        if info["train_rows"] == 0:
            raise ValueError("no training rows left after the hold-out split; add data or lower "
                             "data.holdout_fraction")
        if cfg.train.val_images > 0 and info["val_rows"] == 0:
            raise ValueError("no held-out rows for validation; raise data.holdout_fraction or set "
                             "train.val_images=0")
        empty = data[0].schema.empty_table()
        return (ray.data.from_arrow(train_tables or [empty]), ray.data.from_arrow(val_tables or [empty]), info)
    train_data = open_features(cfg, mix=True)[0] if mix else data  # validation keeps the plain, stable order
    train = train_data.map_batches(keep_train, batch_format="pyarrow")
    val = data.map_batches(keep_val, batch_format="pyarrow")
    return train, val, info


# --- worker side ----------------------------------------------------------------------------------------------

def decode_batch(batch: pa.Table | dict, device, meta: dict | None = None) -> dict[str, Any]:
    """Feature rows -> {"hq", "lq", "sem": float32 tensors on `device`, "ids": list[str]}."""
    import torch

    from pipelines.features.schema import decode_feature_rows

    rows = decode_feature_rows(batch, meta)
    return {"hq": rows["hr_latent"].to(device=device, dtype=torch.float32),
            "lq": rows["lr_latent"].to(device=device, dtype=torch.float32),
            "sem": rows["sem_tokens"].to(device=device, dtype=torch.float32),
            "ids": list(rows["id"])}


SPREAD_LOOKAHEAD = 4  # candidate rows examined per batch, in batches: the bounded look-ahead of spread_batches


def spread_batches(blocks: Iterable[pa.Table], batch_size: int, buffer_size: int, seed: int, key: str = "id",
                   lookahead: int = SPREAD_LOOKAHEAD) -> Iterator[pa.Table]:
    """Full batches of `batch_size` rows drawn at random from a shuffle buffer of `buffer_size` rows, with no two
    rows of one image (`key` column) in a batch while the look-ahead finds another row.

    The buffer fills from `blocks` (in their order) until it holds `buffer_size` rows, then each batch takes
    `batch_size` rows chosen uniformly among up to `lookahead` x `batch_size` random candidates, skipping a
    candidate whose image is already in the batch (if too few distinct ones turn up, the skipped candidates fill
    the batch), and the buffer refills. At the end it drains; a last partial batch is dropped. A block read from
    the feature shards holds all K variants of its images (a row group holds whole images), so a plain shuffle
    buffer of B rows puts two rows of one image in a batch about C(batch, 2) (K-1) / B times per batch, far more
    than random sampling over the whole set ((K-1) / (rows-1) per pair); this keeps it near zero. Deterministic
    for a given block sequence and seed; rows are copied once, into their batch."""
    rng = np.random.default_rng(seed)
    buffer_size = max(int(buffer_size), batch_size)
    source = iter(blocks)
    try:
        yield from _spread(source, batch_size, buffer_size, rng, key, max(1, int(lookahead)) * batch_size)
    finally:  # an epoch left early (a stream closed, a resume's skip) releases the dataset iterator at once
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _spread(source: Iterator[pa.Table], batch_size: int, buffer_size: int, rng: np.random.Generator, key: str,
            n_cand: int) -> Iterator[pa.Table]:
    chunks: dict[int, pa.Table] = {}
    live: dict[int, int] = {}  # rows of each chunk still in the buffer
    s_chunk: list[int] = []  # the buffer's slots: chunk, row in chunk, image key
    s_row: list[int] = []
    s_key: list[Any] = []
    exhausted = False
    next_chunk = 0
    while True:
        while not exhausted and len(s_key) < buffer_size:
            block = next(source, None)
            if block is None:
                exhausted = True
                break
            m = block.num_rows
            if not m:
                continue
            cid, next_chunk = next_chunk, next_chunk + 1
            chunks[cid], live[cid] = block, m
            s_chunk.extend([cid] * m)
            s_row.extend(range(m))
            s_key.extend(block.column(key).to_pylist() if key in block.column_names else
                         [(cid, r) for r in range(m)])
        n = len(s_key)
        if n < batch_size:
            return
        cand = rng.choice(n, size=min(n, n_cand), replace=False).tolist()
        seen: set = set()
        chosen: list[int] = []
        skipped: list[int] = []
        for c in cand:
            if s_key[c] in seen:
                skipped.append(c)
                continue
            seen.add(s_key[c])
            chosen.append(c)
            if len(chosen) == batch_size:
                break
        chosen += skipped[:batch_size - len(chosen)]
        by_chunk: dict[int, list[int]] = {}
        for c in chosen:
            by_chunk.setdefault(s_chunk[c], []).append(s_row[c])
        parts = [chunks[cid].take(pa.array(rows, pa.int64())) for cid, rows in by_chunk.items()]
        for cid, rows in by_chunk.items():
            live[cid] -= len(rows)
            if not live[cid]:
                del live[cid], chunks[cid]
        for c in sorted(chosen, reverse=True):  # swap-remove: the last slot moves into the freed one
            s_chunk[c], s_row[c], s_key[c] = s_chunk[-1], s_row[-1], s_key[-1]
            s_chunk.pop()
            s_row.pop()
            s_key.pop()
        yield parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="default")


def epoch_batches(shard: Any, batch_size: int, shuffle_buffer: int, seed: int, rank: int, epoch: int,
                  prefetch_batches: int = 1) -> Iterator[pa.Table]:
    """One worker's epoch of full pyarrow micro-batches from its dataset shard: through spread_batches with a
    buffer of `shuffle_buffer` samples seeded per (rank, epoch), or (0) in the shard's order."""
    if shuffle_buffer <= 0:
        return iter(shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True,
                                       prefetch_batches=prefetch_batches))
    from vosr.seeding import derive_seed

    blocks = shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_batches)
    return spread_batches(blocks, batch_size, shuffle_buffer, derive_seed(seed, "shuffle", rank, epoch) % 2**63)


class BatchStream:
    """Endless micro-batches of this worker's shard, epoch after epoch, with a resumable position."""

    def __init__(self, shard: Any, batch_size: int, seed: int, rank: int, shuffle_buffer: int,
                 device: Any, epoch: int = 0, batch_in_epoch: int = 0, prefetch_batches: int = 1,
                 meta: dict | None = None):
        self.shard = shard
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer
        self.device = device
        self.epoch = int(epoch)
        self.batch_in_epoch = int(batch_in_epoch)
        self.prefetch_batches = prefetch_batches
        self.meta = meta
        self._it = None

    def _open_epoch(self, skip: int) -> None:
        self.close()
        self._it = epoch_batches(self.shard, self.batch_size, self.shuffle_buffer, self.seed, self.rank,
                                 self.epoch, self.prefetch_batches)
        for _ in range(skip):
            next(self._it)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._open_epoch(self.batch_in_epoch)
        try:
            batch = next(self._it)
        except StopIteration:
            if self.batch_in_epoch == 0:
                raise ValueError(f"rank {self.rank}: its data shard holds no full micro-batch of "
                                 f"{self.batch_size} rows; use more data or a smaller train.batch_size") from None
            self.epoch += 1
            self.batch_in_epoch = 0
            self._open_epoch(0)
            batch = next(self._it)
        self.batch_in_epoch += 1
        return decode_batch(batch, self.device, self.meta)

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = None


def collect_rows(shard: Any, limit: int, device: Any, meta: dict | None = None) -> dict[str, Any] | None:
    """The first `limit` rows of a (non-split) dataset shard as one decoded batch; None when it is empty."""
    tables = []
    count = 0
    for table in shard.iter_batches(batch_size=max(1, limit), batch_format="pyarrow"):
        tables.append(table)
        count += table.num_rows
        if count >= limit:
            break
    if not count:
        return None
    table = pa.concat_tables(tables).slice(0, limit)
    return decode_batch(table, device, meta)
