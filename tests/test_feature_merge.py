"""The streaming shard merge (pipelines/features/writer.merge_parts): same bytes as the in-memory assembly, and a
peak bounded by a few output row groups whatever the shard's size (merge-task memory at real presets)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.features import writer as fw

ROOT = Path(__file__).resolve().parents[1]
ROW_FLOATS = 32 * 1024  # 64 KiB of float16 per row: the feature bytes dominate, as at the real presets
G = 8  # output row group rows (precompute.rows_per_shard)


def _schema() -> pa.Schema:
    """Feature-shard-like: the storage types of feature_schema.tensor_to_arrow (bfloat16 as uint16, float16)."""
    return pa.schema([pa.field("id", pa.string()), pa.field("variant", pa.int32()), pa.field("seed", pa.int64()),
                      pa.field("hr_latent", pa.list_(pa.field("element", pa.uint16(), nullable=False), ROW_FLOATS)),
                      pa.field("sem", pa.list_(pa.field("element", pa.float16(), nullable=False), 64))])


def _part(ids, variants, errors, seed0: int) -> pa.Table:
    n = len(ids)
    vals = (np.arange(n * ROW_FLOATS) % 2048 + seed0).astype(np.uint16)
    lat = pa.FixedSizeListArray.from_arrays(pa.array(vals), type=_schema().field("hr_latent").type)
    sem = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * 64, np.float16)), type=_schema().field("sem").type)
    return pa.table({"id": ids, "variant": pa.array(variants, pa.int32()),
                     "seed": pa.array(range(seed0, seed0 + n), pa.int64()), "hr_latent": lat, "sem": sem,
                     "error": errors})


def assemble_shard(parts: list[pa.Table], schema: pa.Schema) -> tuple[pa.Table, dict[str, int]]:
    """The reference the streaming merge must equal: all rows of one shard in memory -> (sorted table of the good
    rows in the shard schema, failed rows by reason)."""
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


def parquet_bytes(table: pa.Table, settings: dict) -> bytes:
    """The shard file of a whole table written in memory in one go: the layout the streaming merge reproduces."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=settings["compression"], use_dictionary=settings["dictionary"],
                   write_statistics=["id", "variant", "seed"], row_group_size=settings["row_group_size"])
    return buf.getvalue()


def test_streamed_merge_equals_in_memory_assembly_and_stays_under_its_bound(tmp_path):
    rng = np.random.default_rng(0)
    out = str(tmp_path / "features")
    settings = {"output": out, "endpoint_url": "", "schema": _schema(), "compression": None,
                "dictionary": ["id"], "row_group_size": G}
    # 3 parts whose ids interleave (every output row group gathers from every part), two variants, failed rows
    ids = [f"{i:08x}" for i in rng.permutation(600)]
    parts, uris = [], []
    for p in range(3):
        own = sorted(ids[p::3])
        rows = [(i, v) for i in own for v in (0, 1)]
        errors = ["decode:not_image" if (int(r[0], 16) % 17 == 0 and r[1] == 1) else "" for r in rows]
        errors[5] = "encode:nan"
        t = _part([r[0] for r in rows], [r[1] for r in rows], errors, seed0=1000 * p)
        uri = str(tmp_path / "features" / "_parts" / "part-00007" / f"{p}.parquet")
        (tmp_path / "features" / "_parts" / "part-00007").mkdir(parents=True, exist_ok=True)
        pq.write_table(t, uri, compression=None, row_group_size=max(1, G // fw.PART_GROUP_DIVISOR))
        parts.append(t)
        uris.append(uri)
    shard_bytes = sum(t.nbytes for t in parts)
    bound = fw.merge_peak_bound(G, parts[0].nbytes // parts[0].num_rows, sum(t.num_rows for t in parts))
    assert shard_bytes > 4 * bound  # the shard is much larger than the bound: holding it would fail below

    # the merge in a fresh process: its Arrow pool's lifetime peak is the merge's own
    code = ("import json, sys; import pyarrow as pa; from pipelines.features import writer as fw; "
            "from tests.test_feature_merge import _schema; a = json.loads(sys.argv[1]); a[0]['schema'] = _schema(); "
            "s = fw.finalize_shard(*a); print(json.dumps([s, pa.default_memory_pool().max_memory()]))")
    plain = {k: v for k, v in settings.items() if k != "schema"}
    run = subprocess.run([sys.executable, "-c", code, json.dumps([plain, "part-00007.parquet", uris])],
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, check=True)
    stats, peak = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"merge peak {peak} B, bound {bound} B, shard {shard_bytes} B")
    assert 0 < peak <= bound, (peak, bound, shard_bytes)

    table, failed = assemble_shard(parts, settings["schema"])
    want = parquet_bytes(table, settings)
    got = (tmp_path / "features" / "shards" / "part-00007.parquet").read_bytes()
    assert got == want  # byte for byte: rows, order, row groups
    assert pq.ParquetFile(tmp_path / "features" / "shards" / "part-00007.parquet").metadata.num_row_groups == \
        -(-table.num_rows // G)
    on_disk = json.loads((tmp_path / "features" / "shards" / "part-00007.stats.json").read_text())
    assert on_disk == stats
    assert stats["rows"] == table.num_rows and stats["failed_rows_by_reason"] == failed and sum(failed.values()) > 3
    assert stats["images"] == 600 and stats["bytes"] == len(want) and stats["column_bytes"] == fw.column_bytes(want)
    assert not list((tmp_path / "features" / "_parts").rglob("*.parquet"))  # parts removed
    assert not list((tmp_path / "features" / "shards").glob("*.tmp-*"))


def test_merge_of_no_rows_writes_an_empty_shard(tmp_path):
    out = str(tmp_path / "f")
    settings = {"output": out, "endpoint_url": "", "schema": _schema(), "compression": "zstd",
                "dictionary": ["id"], "row_group_size": G}
    stats = fw.finalize_shard(settings, "part-00000.parquet", [])
    got = (tmp_path / "f" / "shards" / "part-00000.parquet").read_bytes()
    assert got == parquet_bytes(_schema().empty_table(), settings)
    assert stats["rows"] == 0 and stats["images"] == 0 and stats["failed_rows_by_reason"] == {}
