"""Feature shards written inside Ray tasks (issue 13.3): no row byte reaches the driver.

Two task kinds, both run on the cluster:

    write_parts     last map stage of the precompute stream: splits one encoded batch by source shard and writes
                    each piece as a part file `_parts/<stem>/<hash>.parquet`; returns one small summary row per
                    piece (shard, part uri, rows) -- the only thing the driver ever reads.
    finalize_shard  remote task launched by the driver when a shard's rows (kept images x K) have all arrived as
                    parts: concatenates them, counts and drops failed rows, sorts by (id, variant), writes
                    `shards/part-<key>.stats.json` then `shards/part-<key>.parquet` (the completion mark) and
                    removes the shard's parts.

The module imports neither torch nor the config (fresh task workers start in a fraction of a second); the driver
hands the tasks a plain `writer_settings(cfg)` dict that holds the shard schema.

Part names are a hash of the part's (id, variant) keys, so a retried task rewrites the same file with the same
bytes; a killed run's leftover parts are never listed (the driver passes the exact parts to merge) and are removed
with the shard's part folder once the shard is final. Peak memory of a merge is about twice the shard's bytes
(curated rows_per_shard x K x bytes per row): size curated shards for it (docs/scale.md).
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

SHARDS_DIR = "shards"  # = pipelines.feature_schema.SHARDS_DIR (not imported here: that module imports torch)
PARTS_DIR = "_parts"
PART_SUMMARY_SCHEMA = pa.schema([pa.field("shard", pa.string()), pa.field("part", pa.string()),
                                 pa.field("rows", pa.int64())])


def basename(uri: str) -> str:
    return posixpath.basename(str(uri).replace("\\", "/"))


def stem(name: str) -> str:
    return name[:-len(".parquet")] if name.endswith(".parquet") else name


def shard_uri(out_root: str, name: str) -> str:
    return storage.join(out_root, SHARDS_DIR, name)


def parts_uri(out_root: str, name: str = "") -> str:
    return storage.join(out_root, PARTS_DIR, stem(name)) if name else storage.join(out_root, PARTS_DIR)


def _part_name(table: pa.Table) -> str:
    h = hashlib.sha256()
    for sid, v in zip(table.column("id").to_pylist(), table.column("variant").to_pylist()):
        h.update(f"{sid}\x00{v}\n".encode())
    return f"{h.hexdigest()[:24]}.parquet"


def write_parts(batch: pa.Table, output: str, endpoint_url: str = "") -> pa.Table:
    """Task (Ray Data map_batches, pyarrow): write the batch's rows per source shard as part files."""
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
            pq.write_table(piece, f, compression=None)
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
    from pipelines.feature_schema import schema_for_config

    pc_ = cfg.precompute
    # Dictionary pages only where values repeat: ids/params, and the pixel codec's 8-bit-level latents. On dense
    # float tensors (VAE latents, ViT tokens) a dictionary only adds a page that is thrown away (~25% overhead).
    dict_cols = ["id", "degrade_params"] + (["hr_latent", "lr_latent"] if cfg.autoencoder.name == "pixel" else [])
    return {"output": pc_.output, "endpoint_url": pc_.s3_endpoint_url, "schema": schema_for_config(cfg),
            "compression": None if pc_.compression == "none" else pc_.compression, "dictionary": dict_cols,
            "row_group_size": max(1, int(pc_.rows_per_shard))}


def parquet_bytes(table: pa.Table, settings: dict) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=settings["compression"], use_dictionary=settings["dictionary"],
                   write_statistics=["id", "variant", "seed"], row_group_size=settings["row_group_size"])
    return buf.getvalue()


def column_bytes(data: bytes) -> dict[str, int]:
    """Compressed bytes per column of a Parquet file (sum over row groups)."""
    md = pq.ParquetFile(io.BytesIO(data)).metadata
    out: dict[str, int] = {}
    for rg in range(md.num_row_groups):
        g = md.row_group(rg)
        for c in range(g.num_columns):
            col = g.column(c)
            top = col.path_in_schema.split(".")[0]
            out[top] = out.get(top, 0) + int(col.total_compressed_size)
    return out


def assemble_shard(parts: list[pa.Table], schema: pa.Schema) -> tuple[pa.Table, dict[str, int]]:
    """All rows of one shard -> (sorted table of the good rows in the shard schema, failed rows by reason)."""
    failed: dict[str, int] = {}
    if not parts:
        return schema.empty_table(), failed
    table = pa.concat_tables([p.select(schema.names + ["error"]) for p in parts])
    for e in table.column("error").to_pylist():
        if e:
            failed[e] = failed.get(e, 0) + 1
    table = table.filter(pc.equal(table.column("error"), ""))
    table = table.sort_by([("id", "ascending"), ("variant", "ascending")])
    return table.drop_columns(["error"]).cast(schema), failed


def write_shard(settings: dict, name: str, parts: list[pa.Table]) -> dict:
    """Assemble one shard's rows, write stats then the shard (the shard's presence marks completion)."""
    out, ep = settings["output"], settings["endpoint_url"]
    table, failed = assemble_shard(parts, settings["schema"])
    data = parquet_bytes(table, settings)
    stats = {"shard": name, "rows": table.num_rows, "images": len(set(table.column("id").to_pylist())),
             "failed_rows_by_reason": failed, "bytes": len(data), "column_bytes": column_bytes(data)}
    storage.write_bytes_atomic(shard_uri(out, f"{stem(name)}.stats.json"), json.dumps(stats, indent=2).encode(), ep)
    storage.write_bytes_atomic(shard_uri(out, name), data, ep)
    return stats


def finalize_shard(settings: dict, name: str, part_uris: list[str]) -> dict:
    """Task: merge one shard's parts into the final shard, then remove its part folder (stale parts included)."""
    ep = settings["endpoint_url"]
    parts = []
    for uri in part_uris:
        fs, path = storage.open_fs(uri, ep)
        with fs.open_input_file(path) as f:
            parts.append(pq.read_table(f))
    stats = write_shard(settings, name, parts)
    del parts
    remove_parts(settings["output"], name, ep)
    return stats


def remove_parts(output: str, name: str = "", endpoint_url: str = "") -> int:
    """Delete the part files of one shard (or all parts when `name` is empty); returns how many were removed."""
    root = parts_uri(output, name)
    storage.refresh_listing(root, endpoint_url)
    files = storage.list_files(root, "", endpoint_url)
    for f in files:
        storage.delete(f, endpoint_url)
    return len(files)
