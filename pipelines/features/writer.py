"""Feature shards written inside Ray tasks: no row byte reaches the driver (docs/scale.md s5).

Two task kinds, both run on the cluster:

    write_parts     last map stage of the precompute stream: splits one encoded batch by source shard and writes
                    each piece as a part file `_parts/<stem>/<hash>.parquet`; returns one small summary row per
                    piece (shard, part uri, rows) -- the only thing the driver ever reads.
    finalize_shard  remote task launched by the driver when a shard's rows (kept images x K) have all arrived as
                    parts: reads their keys, counts and drops failed rows, sorts by (id, variant), streams the
                    rows one output row group at a time into `shards/part-<key>.parquet`, writes
                    `shards/part-<key>.stats.json` before the shard appears (the shard marks completion) and
                    removes the shard's parts.

The module imports neither torch nor the config (fresh task workers start in a fraction of a second); the driver
hands the tasks a plain `writer_settings(cfg)` dict that holds the shard schema.

Part names are a hash of the part's (id, variant) keys, so a retried task rewrites the same file with the same
bytes; a killed run's leftover parts are never listed (the driver passes the exact parts to merge) and are removed
with the shard's part folder once the shard is final. A merge streams: it reads the keys of every row, then
gathers and writes one output row group (precompute.rows_per_shard rows) at a time, so its peak is
`merge_peak_bound` (about 4 row groups of feature bytes), whatever the shard's size.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vosr import storage

SHARDS_DIR = "shards"  # = pipelines.features.schema.SHARDS_DIR (not imported here: that module imports torch)
PARTS_DIR = "_parts"
# Part files hold row groups of 1/PART_GROUP_DIVISOR of the shard's row group: reading a Parquet row group of
# fixed-size lists of 16-bit values transiently takes up to ~8x its bytes (uint16 is stored as INT32 and cast back;
# measured with tests/unit/test_feature_merge.py), so a part row group read costs about one output row group.
PART_GROUP_DIVISOR = 8
PART_SUMMARY_SCHEMA = pa.schema([pa.field("shard", pa.string()), pa.field("part", pa.string()),
                                 pa.field("rows", pa.int64())])


def basename(uri: str) -> str:
    return posixpath.basename(str(uri).replace("\\", "/"))


def stem(name: str) -> str:
    return name[:-len(".parquet")] if name.endswith(".parquet") else name


def shard_uri(out_root: str, name: str) -> str:
    return storage.join(out_root, SHARDS_DIR, name)


def shard_files(out_root: str, endpoint_url: str = "") -> list[str]:
    """The finished feature shards of a precompute output root, sorted: `shards/*.parquet` only. A running or
    killed precompute leaves part files under `_parts/` (duplicate rows, failed rows, an `error` column): every
    reader of the features lists through this, never the root recursively. A shard appears only complete (S3:
    the upload completes on close; local: renamed from a `.tmp-` name, which listings skip)."""
    return storage.list_files(storage.join(out_root, SHARDS_DIR), ".parquet", endpoint_url)


def parts_uri(out_root: str, name: str = "") -> str:
    return storage.join(out_root, PARTS_DIR, stem(name)) if name else storage.join(out_root, PARTS_DIR)


def _part_name(table: pa.Table) -> str:
    h = hashlib.sha256()
    for sid, v in zip(table.column("id").to_pylist(), table.column("variant").to_pylist()):
        h.update(f"{sid}\x00{v}\n".encode())
    return f"{h.hexdigest()[:24]}.parquet"


def write_parts(batch: pa.Table, output: str, endpoint_url: str = "", row_group_size: int | None = None) -> pa.Table:
    """Task (Ray Data map_batches, pyarrow): write the batch's rows per source shard as part files, in row groups
    of `row_group_size` / PART_GROUP_DIVISOR rows (`row_group_size`: the shard's; the merge reads one part row
    group at a time)."""
    part_rows = max(1, int(row_group_size) // PART_GROUP_DIVISOR) if row_group_size else None
    out = {"shard": [], "part": [], "rows": []}
    if batch.num_rows == 0:
        return pa.table(out, schema=PART_SUMMARY_SCHEMA)
    names = pa.array([basename(s) for s in batch.column("src").to_pylist()], pa.string())
    for name in sorted(set(names.to_pylist())):
        piece = batch.filter(pc.equal(names, name)).drop_columns(["src"])
        piece = piece.sort_by([("id", "ascending"), ("variant", "ascending")])
        uri = storage.join(parts_uri(output, name), _part_name(piece))
        fs, path = storage.open_fs(uri, endpoint_url)
        fs.create_dir(posixpath.dirname(path) if storage.is_remote(uri) else os.path.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:  # transient: no compression, one plain write
            pq.write_table(piece, f, compression=None, row_group_size=part_rows)
        out["shard"].append(name)
        out["part"].append(uri)
        out["rows"].append(piece.num_rows)
    return pa.table(out, schema=PART_SUMMARY_SCHEMA)


def count_kept(files: list[str], endpoint_url: str = "") -> dict[str, int]:
    """Task (plan): kept rows per curated shard file, read from the `kept` column only; checks each schema."""
    from pipelines.curate_schema import check_schema

    out = {}
    for f in files:
        fs, path = storage.open_fs(f, endpoint_url)
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            check_schema(pf.schema_arrow)
            out[basename(f)] = int(pc.sum(pf.read(columns=["kept"]).column("kept")).as_py() or 0)
    return out


def writer_settings(cfg) -> dict:
    """What the writing tasks need from the config, as plain values (plus the shard schema)."""
    from pipelines.features.schema import schema_for_config

    pc_ = cfg.precompute
    # Dictionary pages only where values repeat: ids/params, and the pixel codec's 8-bit-level latents. On dense
    # float tensors (VAE latents, ViT tokens) a dictionary only adds a page that is thrown away (~25% overhead).
    dict_cols = ["id", "degrade_params"] + (["hr_latent", "lr_latent"] if cfg.autoencoder.name == "pixel" else [])
    return {"output": pc_.output, "endpoint_url": pc_.s3_endpoint_url, "schema": schema_for_config(cfg),
            "compression": None if pc_.compression == "none" else pc_.compression, "dictionary": dict_cols,
            "row_group_size": max(1, int(pc_.rows_per_shard))}


def _column_bytes_md(md) -> dict[str, int]:
    out: dict[str, int] = {}
    for rg in range(md.num_row_groups):
        g = md.row_group(rg)
        for c in range(g.num_columns):
            col = g.column(c)
            top = col.path_in_schema.split(".")[0]
            out[top] = out.get(top, 0) + int(col.total_compressed_size)
    return out


def column_bytes(data: bytes) -> dict[str, int]:
    """Compressed bytes per column of a Parquet file (sum over row groups)."""
    return _column_bytes_md(pq.ParquetFile(io.BytesIO(data)).metadata)


class _Sink:
    """File-like wrapper the ParquetWriter writes through: counts bytes and ignores close(), so the caller
    closes the real stream (an S3 multipart upload completes, i.e. the object appears, only then) after the
    stats are written."""

    closed = False

    def __init__(self, f):
        self.f, self.n = f, 0

    def write(self, b) -> int:
        self.f.write(b)
        self.n += len(b)
        return len(b)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _part_keys(part_uris: list[str], ep: str) -> tuple[pa.Table, list]:
    """Keys of every part row (id, variant, error, part index, row index) and each part's (row-group starts,
    footer): only these small columns are read here, never the feature columns."""
    keys, metas = [], []
    for p, uri in enumerate(part_uris):
        fs, path = storage.open_fs(uri, ep)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            t = pf.read(columns=["id", "variant", "error"])
            md = pf.metadata
        starts = [0]
        for g in range(md.num_row_groups):
            starts.append(starts[-1] + md.row_group(g).num_rows)
        metas.append((starts, md))
        keys.append(t.append_column("part", pa.array([p] * t.num_rows, pa.int32()))
                    .append_column("row", pa.array(range(t.num_rows), pa.int64())))
    if not keys:
        empty = pa.table({"id": pa.array([], pa.string()), "variant": pa.array([], pa.int32()),
                          "error": pa.array([], pa.string()), "part": pa.array([], pa.int32()),
                          "row": pa.array([], pa.int64())})
        return empty, metas
    return pa.concat_tables(keys, promote_options="permissive"), metas


def _gather(part_uris: list[str], metas: list, parts: list[int], rows: list[int], names: list[str],
            ep: str) -> pa.Table:
    """The rows (part, row) in the given order, reading one part row group at a time (each at most once)."""
    import bisect

    need: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (part, row group) -> [(position, row in group)]
    for pos, (p, r) in enumerate(zip(parts, rows)):
        starts = metas[p][0]
        g = bisect.bisect_right(starts, r) - 1
        need.setdefault((p, g), []).append((pos, r - starts[g]))
    pieces, order = [], []
    for (p, g), items in sorted(need.items()):
        fs, path = storage.open_fs(part_uris[p], ep)
        with fs.open_input_file(path) as f:
            group = pq.ParquetFile(f, metadata=metas[p][1]).read_row_group(g, columns=names)
        pieces.append(group.take(pa.array([r for _, r in items], pa.int64())))
        del group
        order.extend(pos for pos, _ in items)
    table = pa.concat_tables(pieces)
    inverse = [0] * len(order)
    for i, pos in enumerate(order):
        inverse[pos] = i
    return table.take(pa.array(inverse, pa.int64()))


def merge_peak_bound(row_group_rows: int, row_bytes: int, rows: int) -> int:
    """Stated peak of Arrow memory in one merge task (bytes), for a shard of `rows` rows of `row_bytes` bytes
    each (in memory) and output row groups of G = `row_group_rows` rows: the keys of all rows (~256 B each),
    10 G rows of feature bytes and 8 MiB of fixed buffers. Measured ~8 G + 3.3 MiB (tests/unit/test_feature_merge.py,
    16-bit tensors): the row group being written (1), the Parquet writer's pages and buffers (~6: 16-bit values
    are encoded as INT32), the gathered pieces and one part row group being decoded (~1-2), plus the writer's
    1 MiB data pages. Independent of the shard's size."""
    return 256 * rows + 10 * row_group_rows * row_bytes + (8 << 20)


# Beyond merge_peak_bound's Arrow bytes, a merge task's RSS holds the keys as Python lists and the parts' footers
# (per shard row) and the reader's and allocator's buffers (fixed). Measured with
# benchmarks/bench_memory_reads.py --only merge (164 KiB rows, 64-row groups, shards of 512 / 2,048 / 4,096 rows):
# RSS peaks 170 / 181 / 184 MiB against merge_peak_bound's 108-109 MiB, i.e. ~62-75 MiB more, growing ~3.8 KB
# per shard row.
MERGE_RSS_FIXED_BYTES = 80 << 20
MERGE_RSS_BYTES_PER_ROW = 4096


def merge_task_peak_bytes(row_group_rows: int, row_bytes: int, rows: int) -> int:
    """Stated peak RSS of one merge task (its Ray `memory`): merge_peak_bound (Arrow) plus the process's own
    share (MERGE_RSS_FIXED_BYTES + MERGE_RSS_BYTES_PER_ROW per shard row)."""
    return (merge_peak_bound(row_group_rows, row_bytes, rows) + MERGE_RSS_FIXED_BYTES
            + MERGE_RSS_BYTES_PER_ROW * int(rows))


def write_parts_peak_bytes(batch_rows: int, row_bytes: int) -> int:
    """One write_parts task: the encoded batch, each source shard's filtered piece and its sorted copy (three
    copies of the batch at most), plus 8 MiB of writer buffers."""
    return 3 * int(batch_rows) * int(row_bytes) + (8 << 20)


def schema_row_bytes(schema: pa.Schema) -> int:
    """In-memory bytes of one row of a feature schema: the fixed-size tensor columns plus 64 B per other column
    (ids, params: small)."""
    total = 0
    for f in schema:
        t = f.type
        if pa.types.is_fixed_size_list(t) and t.value_type.bit_width > 0:
            total += t.list_size * t.value_type.bit_width // 8
        else:
            total += 64
    return total


def merge_parts(settings: dict, name: str, part_uris: list[str]) -> dict:
    """Stream one shard's parts into the final shard, one output row group at a time: the keys of every row are
    read first (sort by (id, variant), count and drop failed rows), then each output row group's rows are
    gathered from the parts' row groups and written by one ParquetWriter. The file is byte for byte the one a
    single write of all good rows, sorted, would give (tests/unit/test_feature_merge.py checks it); the peak is `merge_peak_bound`, not the shard's size.
    Stats are written before the shard appears (its presence marks completion)."""
    import uuid

    out, ep, schema = settings["output"], settings["endpoint_url"], settings["schema"]
    g_rows = max(1, int(settings["row_group_size"]))
    keys, metas = _part_keys(part_uris, ep)
    failed: dict[str, int] = {}
    for e in keys.column("error").to_pylist():
        if e:
            failed[e] = failed.get(e, 0) + 1
    good = keys.filter(pc.equal(keys.column("error"), "")).sort_by([("id", "ascending"), ("variant", "ascending")])
    parts_of, rows_of = good.column("part").to_pylist(), good.column("row").to_pylist()
    images = len(set(good.column("id").to_pylist()))
    del keys
    uri = shard_uri(out, name)
    fs, path = storage.open_fs(uri, ep)
    remote = storage.is_remote(uri)
    fs.create_dir(posixpath.dirname(path) if remote else os.path.dirname(path), recursive=True)
    # S3: the object appears when the stream closes (after the stats); local: a temporary name, renamed after
    target = path if remote else f"{path}.tmp-{uuid.uuid4().hex}"
    stream = fs.open_output_stream(target)
    sink = _Sink(stream)
    try:
        writer = pq.ParquetWriter(sink, schema, compression=settings["compression"],
                                  use_dictionary=settings["dictionary"], write_statistics=["id", "variant", "seed"])
        if not parts_of:
            writer.write_table(schema.empty_table(), row_group_size=g_rows)
        for s in range(0, len(parts_of), g_rows):
            chunk = _gather(part_uris, metas, parts_of[s:s + g_rows], rows_of[s:s + g_rows], schema.names, ep)
            writer.write_table(chunk.cast(schema), row_group_size=g_rows)
            del chunk
        writer.close()
        md = writer.writer.metadata
        stats = {"shard": name, "rows": len(parts_of), "images": images, "failed_rows_by_reason": failed,
                 "bytes": sink.n, "column_bytes": _column_bytes_md(md)}
        storage.write_bytes_atomic(shard_uri(out, f"{stem(name)}.stats.json"), json.dumps(stats, indent=2).encode(),
                                   ep)
    except BaseException:
        # pyarrow cannot abort an S3 upload (closing completes it): close, then delete the partial file. A killed
        # process never completes its upload, so no partial object appears then.
        stream.close()
        fs.delete_file(target)
        raise
    stream.close()
    if not remote:
        fs.move(target, path)
    return stats


def finalize_shard(settings: dict, name: str, part_uris: list[str]) -> dict:
    """Task: merge one shard's parts into the final shard (streamed, `merge_parts`), then remove its part folder
    (stale parts included)."""
    stats = merge_parts(settings, name, part_uris)
    remove_parts(settings["output"], name, settings["endpoint_url"])
    return stats


def remove_parts(output: str, name: str = "", endpoint_url: str = "") -> int:
    """Delete the part files of one shard (or all parts when `name` is empty); returns how many were removed."""
    root = parts_uri(output, name)
    files = storage.list_files(root, "", endpoint_url)
    for f in files:
        storage.delete(f, endpoint_url)
    return len(files)
