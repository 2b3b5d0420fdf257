"""Stage 1 of curation, one input block at a time: fetch (HTTP or storage) -> safe decode -> quality filters ->
hashes and embedding. Every input row ends in the block's ledger shard with "ok" or its failure/filter reason;
the shard is written atomically and names the block, so a re-run skips finished blocks.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.curate_schema import STAGE1_DIR, STAGE1_SCHEMA
from pipelines.curation.analysis import Rejected, analyse
from pipelines.curation.crawl import FetchResult, fetch_urls
from pipelines.curation.sources import Item, Unit, read_items
from vosr import storage

# Reasons that mean "an image was received and decoded but a quality filter removed it" (paper s4.1).
FILTER_REASONS = ("too_small", "bad_aspect", "low_gradient", "low_entropy")


def refresh_listing(uri: str, endpoint_url: str = "") -> None:
    """Drop s3fs's cached directory listings: a listing cached before other processes wrote shards would
    otherwise hide those shards from exists/list/read in this process."""
    if uri.startswith("s3://"):
        storage.fsspec_fs(uri, endpoint_url).invalidate_cache()


def stage1_uri(output: str, key: str, suffix: str = ".parquet") -> str:
    return storage.join(output, STAGE1_DIR, key + suffix)


def row_id(data: bytes, source: str) -> str:
    """Content-derived id: blake2b-128 over (sha256 of the encoded bytes, source), so the same file at two
    sources gets two ids (they dedup as exact duplicates) and ids stay unique."""
    h = hashlib.blake2b(digest_size=16)
    h.update(hashlib.sha256(data).digest())
    h.update(source.encode())
    return h.hexdigest()


def _fetch_files(items: list[Item], max_bytes: int, endpoint_url: str) -> list[FetchResult]:
    out = []
    for it in items:
        try:
            fs, path = storage.open_fs(it.source, endpoint_url)
            size = fs.get_file_info(path).size
            if size is not None and size > max_bytes:
                out.append(FetchResult(it.source, "oversize", None, f"{size} bytes > {max_bytes}"))
                continue
            with fs.open_input_stream(path) as f:
                data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                out.append(FetchResult(it.source, "oversize", None, f"> {max_bytes} bytes"))
            else:
                out.append(FetchResult(it.source, "ok", data, attempts=1))
        except (OSError, ValueError) as exc:
            out.append(FetchResult(it.source, "read_error", None, f"{type(exc).__name__}: {str(exc)[:200]}"))
    return out


def process_unit(unit: Unit, key: str, ccfg) -> tuple[pa.Table, dict]:
    """Run stage 1 on one block; returns (ledger table in STAGE1_SCHEMA, stats dict). Pure, writes nothing."""
    t0 = time.perf_counter()
    items = list(read_items(unit, ccfg.s3_endpoint_url))
    if unit.kind == "files":
        fetched = _fetch_files(items, ccfg.crawl.max_bytes, ccfg.s3_endpoint_url)
    else:
        fetched = fetch_urls([it.source for it in items], ccfg.crawl)
    rows: list[dict] = []
    failed: Counter = Counter()
    filtered: Counter = Counter()
    n_fetched = ok = 0
    for it, res in zip(items, fetched):
        row = {"unit": key, "row": it.index, "source": it.source, "list_category": it.category}
        if res.reason != "ok":
            failed[res.reason] += 1
            rows.append({**row, "reason": res.reason, "detail": res.detail})
            continue
        n_fetched += 1
        data = res.data or b""
        try:
            a = analyse(data, ccfg.filters)
        except Rejected as rej:
            (filtered if rej.reason in FILTER_REASONS else failed)[rej.reason] += 1
            rows.append({**row, "reason": rej.reason, "detail": rej.detail})
            continue
        ok += 1
        rows.append({**row, "reason": "ok", "detail": "", "id": row_id(data, it.source), "image": data,
                     "format": a.format, "width": a.width, "height": a.height, "sha256": a.sha256,
                     "phash": a.phash, "dhash": a.dhash, "gradient": a.gradient, "entropy": a.entropy,
                     "embedding": a.embedding.tolist()})
    table = pa.Table.from_pylist(rows, schema=STAGE1_SCHEMA)
    stats = {"unit": key, "seen": len(items), "fetched": n_fetched, "ok": ok, "failed": dict(sorted(failed.items())),
             "filtered": dict(sorted(filtered.items())), "seconds": round(time.perf_counter() - t0, 4)}
    return table, stats


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def run_unit(unit: Unit, key: str, ccfg) -> dict:
    """Process one block unless its ledger shard exists; write stats JSON then the shard (the completion mark)."""
    out = ccfg.output
    shard = stage1_uri(out, key)
    refresh_listing(shard, ccfg.s3_endpoint_url)
    if storage.exists(shard, ccfg.s3_endpoint_url):
        return {"unit": key, "skipped": True, "stats": ""}
    table, stats = process_unit(unit, key, ccfg)
    storage.write_bytes_atomic(stage1_uri(out, key, ".stats.json"), json.dumps(stats, indent=1).encode(),
                               ccfg.s3_endpoint_url)
    storage.write_bytes_atomic(shard, table_bytes(table), ccfg.s3_endpoint_url)
    return {"unit": key, "skipped": False, "stats": json.dumps(stats)}
