"""Final curated shards: one per input block, built from the block's stage-1 ledger and the stage-2 decisions
for its rows, each file written atomically: the Parquet shard first, its stats JSON last. The stats JSON is the commit
marker: it names the stage-2 fingerprint the shard was made with, so a run killed between the two writes leaves
either no stats (the shard counts as incomplete) or the stats of an older shard with an older fingerprint (the shard
counts as stale); both are rewritten by the next run and never accepted (see curate_schema.shard_files)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobkit.memprobe import probe
from pipelines.curate_schema import CURATED_SCHEMA, SHARDS_DIR
from pipelines.curation.stage1 import ledger_uri, reason_counts, streamable_pages
from vosr import storage

DECISION_SCHEMA = pa.schema([
    pa.field("unit", pa.string()), pa.field("row", pa.int32()), pa.field("kind", pa.int8()),
    pa.field("id", pa.string()), pa.field("category", pa.string()), pa.field("category_source", pa.string()),
    pa.field("duplicate_of", pa.string()), pa.field("drop_reason", pa.string()),
    pa.field("ledger_gen", pa.int32()),  # marker rows: the block's ledger generation (stage1.py); else null
])
KIND_MARKER, KIND_DECISION = 0, 1
RESULT_SCHEMA = pa.schema([pa.field("unit", pa.string()), pa.field("skipped", pa.bool_()),
                           pa.field("stats", pa.string())])


def shard_uri(output: str, unit: str, suffix: str = ".parquet") -> str:
    return storage.join(output, SHARDS_DIR, f"part-{unit}{suffix}")


def ledger_counts(ledger: pa.Table) -> dict:
    """stage1.reason_counts of the ledger, plus the decoded images by declared type."""
    return {**reason_counts(ledger["reason"].to_pylist()), "ok_by_declared_type": declared_types(ledger)}


def declared_types(ledger: pa.Table) -> dict:
    """Images that decoded, counted by the Content-Type their server declared (media type only; "none" for files
    and answers without one): how often the declared type was wrong (a count the curate summary reports)."""
    if "declared_type" not in ledger.column_names:
        return {}
    ok = pa.compute.equal(ledger["reason"], "ok")
    return dict(sorted(Counter(_media_type(t) for t in ledger.filter(ok)["declared_type"].to_pylist()).items()))


_MEDIA_TYPE = re.compile(r"^(image|text|application|binary|video|audio|multipart|font)/[a-z0-9][a-z0-9.+-]{0,40}$")


def _media_type(declared: str | None) -> str:
    """A stats key for a declared Content-Type: its media type (a metric-safe name), "none", or "other" for
    anything malformed (so a server cannot grow the stats with made-up types)."""
    t = (declared or "").split(";", 1)[0].strip().lower()
    if not t:
        return "none"
    return t.replace("+", "_") if _MEDIA_TYPE.match(t) else "other"


# The columns of a block's ledger that the final shard is made of (not its embedding or detail text).
LEDGER_COLUMNS = ["row", "reason", "id", "source", "image", "format", "width", "height", "sha256", "phash", "dhash",
                  "gradient", "entropy", "native_scale", "sharpness", "fidelity", "metadata"]
WRITE_SLICE_BYTES = 8 * 2**20  # the ledger is read, and the shard written, this many bytes of rows at a time
WRITE_SLICE_FACTOR = 8  # measured peak per slice byte (decode, "ok" rows taken, pages encoded, allocator slack)
WRITE_ROW_BYTES = 1024  # the block's decisions, per ledger row (a few small Python records)
WRITE_MARGIN_BYTES = 16 * 2**20


def write_slice_bytes(ledger_bytes: int) -> int:
    """Bytes of ledger rows per slice: WRITE_SLICE_BYTES, or a sixteenth of a smaller ledger (at least 256 KiB)."""
    return int(min(WRITE_SLICE_BYTES, max(2**18, ledger_bytes // 16)))


def write_peak_bytes(ledger_bytes: int, rows: int = 0, page_bytes: int = 0) -> int:
    """A write task's peak for a block whose ledger holds `ledger_bytes` (its Parquet file's uncompressed size)
    in `rows` rows: WRITE_SLICE_FACTOR x one slice (the slice decoded, its "ok" rows taken, the shard's pages
    encoded, what the allocator keeps between slices), the block's decisions (WRITE_ROW_BYTES a row), the
    ledger's largest page read whole, twice (`page_bytes`: about 1 MiB plus one image for ledgers written with
    stage1.streamable_pages; a ledger written before holds a row group's images in one page, up to
    stage1_buffer_mb), plus the margin. The ledger is never held whole and the shard is streamed to storage one
    row group per slice: 8 x 8 MiB + 16 MiB = 80 MiB plus the decisions and pages whatever the ledger's size, and
    about 0.5 x a small ledger + 16 MiB."""
    return (WRITE_SLICE_FACTOR * write_slice_bytes(ledger_bytes) + WRITE_ROW_BYTES * int(rows) + 2 * int(page_bytes)
            + WRITE_MARGIN_BYTES)


def write_task_memory(ccfg) -> int:
    """The memory a write task reserves: write_peak_bytes for the largest block a config allows (a ledger of
    rows_per_shard rows is streamed in slices, so only its rows and page size matter), pages as large as a
    stage-1 row group (ledgers written before streamable pages) or one image at the fetch cap."""
    page = max(ccfg.stage1_buffer_mb * 2**20, ccfg.crawl.max_bytes + 2**20)
    return write_peak_bytes(WRITE_SLICE_BYTES * 16, ccfg.rows_per_shard, page)


def _decisions(group: pa.Table) -> dict[int, dict]:
    """Per ledger row, the merged stage-2 records of one block (its category record, with a cap drop, and its
    duplicate record); a block's records are at most a few per row of the block."""
    decisions: dict[int, dict] = {}
    for d in group.filter(pc.equal(group["kind"], KIND_DECISION)).to_pylist():
        cur = decisions.setdefault(d["row"], {"category": None, "category_source": None, "duplicate_of": None,
                                              "drop_reason": None})
        if d["category"] is not None:  # the category record (possibly with a cap drop)
            cur["category"], cur["category_source"] = d["category"], d["category_source"]
        if d["drop_reason"] == "duplicate":
            cur["duplicate_of"], cur["drop_reason"] = d["duplicate_of"], "duplicate"
        elif d["drop_reason"] is not None and cur["drop_reason"] is None:
            cur["drop_reason"] = d["drop_reason"]
    return decisions


_COPIED = ["format", "width", "height", "sha256", "phash", "dhash", "gradient", "entropy", "native_scale", "sharpness",
           "fidelity"]


def _masked(images, keep: pa.BooleanArray) -> pa.Array:
    """The image column with the dropped rows null, sharing the images' buffers (no copy of the bytes): only the
    validity bitmap is new. (Null rows are not written to the shard.)"""
    arr = images.combine_chunks() if isinstance(images, pa.ChunkedArray) else images
    valid = pc.and_(pc.is_valid(arr), keep)
    if arr.offset:  # the bitmap must line up with the buffers' offset
        valid = pa.concat_arrays([pa.array([False] * arr.offset), valid])
    bitmap = pa.array(valid.to_numpy(zero_copy_only=False), pa.bool_()).buffers()[1]
    n_null = len(arr) - int(pc.sum(valid.slice(arr.offset)).as_py() or 0)
    return pa.Array.from_buffers(arr.type, len(arr), [bitmap, *arr.buffers()[1:]], n_null, arr.offset)


def _shard_slice(t: pa.Table, decisions: dict[int, dict], unit: str, tally: dict) -> pa.Table:
    """The final rows (CURATED_SCHEMA) of one slice of a ledger: its "ok" rows with their decisions; dropped rows
    without their image. Adds the slice's counts to `tally`."""
    is_ok = pc.equal(t["reason"], "ok")
    ok = t if pc.all(is_ok).as_py() else t.filter(is_ok)
    cols: dict[str, list] = {"category": [], "category_source": [], "duplicate_of": [], "drop_reason": []}
    for r in ok["row"].to_pylist():
        d = decisions.get(r)
        if d is None:
            raise RuntimeError(f"no stage-2 decision for row {r} of block {unit}")
        for c in cols:
            cols[c].append(d[c])
    drop = cols["drop_reason"]
    cols["duplicate_of"] = [x if reason == "duplicate" else None for x, reason in zip(cols["duplicate_of"], drop)]
    kept = [reason is None for reason in drop]
    tally["duplicates"] += sum(x == "duplicate" for x in drop)
    tally["capped"] += sum(x == "category_cap" for x in drop)
    tally["kept"] += sum(kept)
    tally["cats"].update(c for c, k in zip(cols["category"], kept) if k)
    keep = pa.array(kept, pa.bool_())
    return pa.table({
        "id": ok["id"], "source": ok["source"], "image": _masked(ok["image"], keep),
        **{c: ok[c] if c in ok.column_names else pa.nulls(ok.num_rows, CURATED_SCHEMA.field(c).type)
           for c in _COPIED},  # a ledger of an older schema lacks the newer columns
        **{c: pa.array(cols[c], pa.string()) for c in ("category", "category_source", "duplicate_of")},
        "kept": keep, "drop_reason": pa.array(drop, pa.string()),
        "metadata": ok["metadata"] if "metadata" in ok.column_names else pa.nulls(ok.num_rows, pa.string()),
    }).cast(CURATED_SCHEMA)


@probe("write_shard")
def write_unit_shard(group: pa.Table, output: str, endpoint_url: str, fingerprint: str) -> pa.Table:
    """Write one block's final shard, unless a complete shard made with the same stage-2 decisions exists (its
    stats JSON, written last, carries `fingerprint`). The ledger is read and the shard streamed to storage one
    slice of rows at a time (rows in the ledger's order); memory: write_peak_bytes."""
    unit = group["unit"][0].as_py()
    target = shard_uri(output, unit)
    stats_uri = shard_uri(output, unit, ".stats.json")
    if storage.exists(target, endpoint_url) and storage.exists(stats_uri, endpoint_url):
        stats = storage.read_bytes(stats_uri, endpoint_url).decode()
        if json.loads(stats).get("fingerprint") == fingerprint:
            return pa.table({"unit": [unit], "skipped": [True], "stats": [stats]}, schema=RESULT_SCHEMA)
    marks = group.filter(pc.equal(group["kind"], KIND_MARKER))["ledger_gen"].to_pylist()
    if len(marks) != 1:
        raise RuntimeError(f"block {unit}: expected one marker row in the stage-2 decisions, found {len(marks)}")
    decisions = _decisions(group)
    tally: dict = {"duplicates": 0, "capped": 0, "kept": 0, "cats": Counter()}
    fs, path = storage.open_fs(ledger_uri(output, unit, marks[0] or 0), endpoint_url)
    with fs.open_input_file(path) as f, storage.atomic_output(target, endpoint_url) as sink:
        pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=2**20)  # pages streamed, not whole column chunks
        names = pf.schema_arrow.names
        counts = ledger_counts(pf.read(columns=[c for c in ("reason", "declared_type") if c in names]))
        md = pf.metadata
        total = sum(md.row_group(g).total_byte_size for g in range(md.num_row_groups))
        batch = int(min(1 << 16, max(1, write_slice_bytes(total) * max(1, md.num_rows) // max(1, total))))
        out = pq.ParquetWriter(sink, CURATED_SCHEMA, compression="zstd",
                               **streamable_pages(CURATED_SCHEMA))
        wrote = False
        cols = [c for c in LEDGER_COLUMNS if c in names]  # a ledger of an older schema has no metadata
        for rb in pf.iter_batches(batch_size=batch, columns=cols, use_threads=False):
            part = _shard_slice(pa.Table.from_batches([rb]), decisions, unit, tally)
            del rb
            if part.num_rows or not wrote:
                out.write_table(part)
                wrote = True
            del part
            pa.default_memory_pool().release_unused()  # give the slice's buffers back before the next one
        if not wrote:
            out.write_table(CURATED_SCHEMA.empty_table())
        out.close()
    stats = {"unit": unit, "fingerprint": fingerprint, **counts, "duplicates": tally["duplicates"],
             "capped": tally["capped"], "kept": tally["kept"], "kept_by_category": dict(sorted(tally["cats"].items()))}
    text = json.dumps(stats, indent=1)
    storage.write_bytes_atomic(stats_uri, text.encode(), endpoint_url)  # the commit marker, last
    return pa.table({"unit": [unit], "skipped": [False], "stats": [text]}, schema=RESULT_SCHEMA)
