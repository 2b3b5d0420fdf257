"""Final curated shards: one per input block, built from the block's stage-1 ledger and the stage-2 decisions
for its rows, each file written atomically: the Parquet shard first, its stats JSON last. The stats JSON is the commit
marker: it names the stage-2 fingerprint the shard was made with, so a run killed between the two writes leaves
either no stats (the shard counts as incomplete) or the stats of an older shard with an older fingerprint (the shard
counts as stale); both are rewritten by the next run and never accepted (see curate_schema.shard_files)."""

from __future__ import annotations

import io
import json
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.curate_schema import CURATED_SCHEMA, SHARDS_DIR
from pipelines.curation.stage1 import ledger_uri, reason_counts, table_bytes
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
    and answers without one): how often the declared type was wrong (issue 14)."""
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


def write_unit_shard(group: pa.Table, output: str, endpoint_url: str, fingerprint: str) -> pa.Table:
    """Write one block's final shard, unless a complete shard made with the same stage-2 decisions exists (its
    stats JSON, written last, carries `fingerprint`)."""
    unit = group["unit"][0].as_py()
    target = shard_uri(output, unit)
    stats_uri = shard_uri(output, unit, ".stats.json")
    if storage.exists(target, endpoint_url) and storage.exists(stats_uri, endpoint_url):
        stats = storage.read_bytes(stats_uri, endpoint_url).decode()
        if json.loads(stats).get("fingerprint") == fingerprint:
            return pa.table({"unit": [unit], "skipped": [True], "stats": [stats]}, schema=RESULT_SCHEMA)
    marks = group.filter(pa.compute.equal(group["kind"], KIND_MARKER))["ledger_gen"].to_pylist()
    if len(marks) != 1:
        raise RuntimeError(f"block {unit}: expected one marker row in the stage-2 decisions, found {len(marks)}")
    fs, path = storage.open_fs(ledger_uri(output, unit, marks[0] or 0), endpoint_url)
    with fs.open_input_file(path) as f:
        ledger = pq.read_table(f)
    decisions: dict[int, dict] = {}
    for d in group.filter(pa.compute.equal(group["kind"], KIND_DECISION)).to_pylist():
        cur = decisions.setdefault(d["row"], {"category": None, "category_source": None, "duplicate_of": None,
                                              "drop_reason": None})
        if d["category"] is not None:  # the category record (possibly with a cap drop)
            cur["category"], cur["category_source"] = d["category"], d["category_source"]
        if d["drop_reason"] == "duplicate":
            cur["duplicate_of"], cur["drop_reason"] = d["duplicate_of"], "duplicate"
        elif d["drop_reason"] is not None and cur["drop_reason"] is None:
            cur["drop_reason"] = d["drop_reason"]
    ok = ledger.filter(pa.compute.equal(ledger["reason"], "ok")).sort_by("row")
    rows = []
    cats: Counter = Counter()
    dup = capped = kept_n = 0
    for r in ok.to_pylist():
        d = decisions.get(r["row"])
        if d is None:
            raise RuntimeError(f"no stage-2 decision for row {r['row']} of block {unit}")
        drop = d["drop_reason"]
        kept = drop is None
        dup += drop == "duplicate"
        capped += drop == "category_cap"
        if kept:
            kept_n += 1
            cats[d["category"]] += 1
        rows.append({"id": r["id"], "source": r["source"], "image": r["image"] if kept else None,
                     "format": r["format"], "width": r["width"], "height": r["height"], "sha256": r["sha256"],
                     "phash": r["phash"], "dhash": r["dhash"], "gradient": r["gradient"], "entropy": r["entropy"],
                     "native_scale": r["native_scale"], "sharpness": r["sharpness"], "fidelity": r["fidelity"],
                     "category": d["category"], "category_source": d["category_source"],
                     "duplicate_of": d["duplicate_of"] if drop == "duplicate" else None, "kept": kept,
                     "drop_reason": drop, "metadata": r.get("metadata")})
    table = pa.Table.from_pylist(rows, schema=CURATED_SCHEMA)
    stats = {"unit": unit, "fingerprint": fingerprint, **ledger_counts(ledger), "duplicates": dup, "capped": capped, "kept": kept_n,
             "kept_by_category": dict(sorted(cats.items()))}
    text = json.dumps(stats, indent=1)
    storage.write_bytes_atomic(target, table_bytes(table), endpoint_url)
    storage.write_bytes_atomic(stats_uri, text.encode(), endpoint_url)  # the commit marker, last
    return pa.table({"unit": [unit], "skipped": [False], "stats": [text]}, schema=RESULT_SCHEMA)


def read_parquet_bytes(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def write_task_peak_bytes(ledger_bytes: int) -> int:
    """Stated peak of one write_unit_shard task as the code stands: the block's whole ledger with its image bytes,
    then its to_pylist / from_pylist copies and the shard's in-memory table (4 copies)."""
    return 4 * int(ledger_bytes) + (64 << 20)
