"""Stage 1 of curation, one input block at a time: fetch (HTTP or storage) -> safe decode -> quality filters ->
hashes and embedding. Every input row ends in the block's ledger shard with "ok" or its failure/filter reason;
the shard is written atomically and names the block, so a re-run skips finished blocks.

Re-runs retry transient failures (crawl.retry_next_run: timeouts, 429, 5xx, connection errors). Files under
_stage1/ for block <key>:
    <key>.parquet          ledger, generation 0 (the first complete pass)
    <key>.g<n>.parquet     ledger, generation n: a re-run re-fetched its retryable rows and something changed
    <key>.retry            marker: the latest ledger still has retryable rows (written before that ledger)
    <key>.stats.json       counts of the latest ledger
A retry pass writes generation n+1 (atomically), then deletes generation n, then drops the marker when nothing
retryable is left; a run killed between these steps leaves states the next run resolves (highest generation
wins, stale generations are deleted, a marker without a ledger is ignored). Generations enter the stage-2
fingerprint, so final shards made from older ledgers are never kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections import Counter
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.curate_schema import STAGE1_DIR, STAGE1_SCHEMA
from pipelines.curation.analysis import Rejected, analyse
from pipelines.curation.crawl import FetchResult, fetch_urls, retry_next_run
from pipelines.curation.sources import Item, Unit, read_items
from vosr import storage

# Reasons that mean "an image was received and decoded but a quality filter removed it" (paper s4.1).
FILTER_REASONS = ("too_small", "bad_aspect", "low_gradient", "low_entropy", "low_sharpness")


def stage1_uri(output: str, key: str, suffix: str = ".parquet") -> str:
    return storage.join(output, STAGE1_DIR, key + suffix)


def ledger_uri(output: str, key: str, gen: int = 0) -> str:
    """The ledger of block `key` at generation `gen` (0: first pass; n: after n changing retry passes)."""
    return stage1_uri(output, key if gen == 0 else f"{key}.g{gen}")


_LEDGER_NAME = re.compile(r"^([0-9a-f]+)(?:\.g([0-9]+))?\.parquet$")
_MARKER_NAME = re.compile(r"^([0-9a-f]+)\.retry$")


def scan_stage1(output: str, endpoint_url: str = "") -> tuple[dict[str, int], set[str], list[str]]:
    """One listing of _stage1/: (latest ledger generation per finished block, blocks whose latest ledger has
    retryable rows, URIs of superseded ledger generations left by a killed run)."""
    storage.refresh_listing(output, endpoint_url)
    found: dict[str, list[tuple[int, str]]] = {}
    markers: set[str] = set()
    for uri in storage.list_files(storage.join(output, STAGE1_DIR), endpoint_url=endpoint_url):
        name = PurePosixPath(uri).name
        m = _LEDGER_NAME.match(name)
        if m:
            found.setdefault(m.group(1), []).append((int(m.group(2) or 0), uri))
            continue
        m = _MARKER_NAME.match(name)
        if m:
            markers.add(m.group(1))
    gens, stale = {}, []
    for key, versions in found.items():
        versions.sort()
        gens[key] = versions[-1][0]
        stale.extend(u for _, u in versions[:-1])
    return gens, markers & set(gens), stale


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


def _fetch(unit: Unit, items: list[Item], ccfg) -> list[FetchResult]:
    if unit.kind == "files":
        return _fetch_files(items, ccfg.crawl.max_bytes, ccfg.s3_endpoint_url)
    return fetch_urls([it.source for it in items], ccfg.crawl)


def _ledger_rows(key: str, items: list[Item], fetched: list[FetchResult], ccfg) -> list[dict]:
    """One ledger row per item: "ok" with image, hashes and embedding, or the failure/filter reason."""
    rows: list[dict] = []
    for it, res in zip(items, fetched):
        row = {"unit": key, "row": it.index, "source": it.source, "list_category": it.category,
               "declared_type": res.content_type or None}  # recorded only: the bytes decide (imageio.sniff)
        if res.reason != "ok":
            rows.append({**row, "reason": res.reason, "detail": res.detail})
            continue
        data = res.data or b""
        try:
            a = analyse(data, ccfg.filters)
        except Rejected as rej:
            rows.append({**row, "reason": rej.reason, "detail": rej.detail})
            continue
        rows.append({**row, "reason": "ok", "detail": "", "id": row_id(data, it.source), "image": data,
                     "format": a.format, "width": a.width, "height": a.height, "sha256": a.sha256,
                     "phash": a.phash, "dhash": a.dhash, "gradient": a.gradient, "entropy": a.entropy,
                     "embedding": a.embedding.tolist(), "sharpness": a.sharpness, "fidelity": a.fidelity})
    return rows


def ledger_stats(key: str, reasons: list[str], seconds: float) -> dict:
    """Counts of one ledger: seen, fetched (a body arrived), ok, failed/filtered by reason, retryable rows."""
    from vosr.imageio import DECODE_REASONS

    counts = Counter(reasons)
    ok = counts.pop("ok", 0)
    filtered = {r: n for r, n in counts.items() if r in FILTER_REASONS}
    failed = {r: n for r, n in counts.items() if r not in FILTER_REASONS}
    not_fetched = sum(n for r, n in failed.items() if r not in DECODE_REASONS)
    return {"unit": key, "seen": len(reasons), "fetched": len(reasons) - not_fetched, "ok": ok,
            "failed": dict(sorted(failed.items())), "filtered": dict(sorted(filtered.items())),
            "retryable": sum(n for r, n in failed.items() if retry_next_run(r)), "seconds": round(seconds, 4)}


def process_unit(unit: Unit, key: str, ccfg) -> tuple[pa.Table, dict]:
    """Run stage 1 on one block; returns (ledger table in STAGE1_SCHEMA, stats dict). Pure, writes nothing."""
    t0 = time.perf_counter()
    items = list(read_items(unit, ccfg.s3_endpoint_url))
    rows = _ledger_rows(key, items, _fetch(unit, items, ccfg), ccfg)
    table = pa.Table.from_pylist(rows, schema=STAGE1_SCHEMA)
    return table, ledger_stats(key, [r["reason"] for r in rows], time.perf_counter() - t0)


def retry_unit(unit: Unit, key: str, ledger: pa.Table, ccfg) -> tuple[pa.Table, dict, int]:
    """Fetch again the rows of a finished ledger that failed with a retryable reason; returns (new ledger, its
    stats, number of rows retried). Other rows are kept as they are (finished work is never redone)."""
    t0 = time.perf_counter()
    old = ledger.to_pylist()
    redo = {r["row"] for r in old if retry_next_run(r["reason"])}
    if not redo:
        return ledger, ledger_stats(key, [r["reason"] for r in old], 0.0), 0
    items = [it for it in read_items(unit, ccfg.s3_endpoint_url) if it.index in redo]
    if len(items) != len(redo):
        raise RuntimeError(f"block {key}: the input changed under its ledger ({len(items)} of {len(redo)} rows "
                           "to retry found); use a new output or remove its _stage1/")
    fresh = {r["row"]: r for r in _ledger_rows(key, items, _fetch(unit, items, ccfg), ccfg)}
    rows = [fresh.get(r["row"], r) for r in old]
    table = pa.Table.from_pylist(rows, schema=STAGE1_SCHEMA)
    return table, ledger_stats(key, [r["reason"] for r in rows], time.perf_counter() - t0), len(redo)


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def run_unit(unit: Unit, key: str, ccfg, gen: int = -1) -> dict:
    """Stage 1 of one block. gen < 0: first pass, unless its ledger exists (then skipped). gen >= 0: retry pass
    over the retryable rows of ledger generation `gen` (see the module docstring for the file protocol)."""
    ep = ccfg.s3_endpoint_url
    out = ccfg.output
    marker = stage1_uri(out, key, ".retry")
    if gen < 0:
        shard = ledger_uri(out, key)
        storage.refresh_listing(shard, ep)
        if storage.exists(shard, ep):
            return {"unit": key, "skipped": True, "stats": "", "retried": 0, "changed": False}
        table, stats = process_unit(unit, key, ccfg)
        if stats["retryable"] and ccfg.retry_failed:
            storage.write_bytes_atomic(marker, b"", ep)
        storage.write_bytes_atomic(stage1_uri(out, key, ".stats.json"), json.dumps(stats, indent=1).encode(), ep)
        storage.write_bytes_atomic(shard, table_bytes(table), ep)
        return {"unit": key, "skipped": False, "stats": json.dumps(stats), "retried": 0, "changed": True}
    current = ledger_uri(out, key, gen)
    fs, path = storage.open_fs(current, ep)
    with fs.open_input_file(path) as f:
        ledger = pq.read_table(f)
    table, stats, retried = retry_unit(unit, key, ledger, ccfg)
    changed = retried > 0 and not table.drop_columns(["detail"]).equals(ledger.drop_columns(["detail"]))
    if changed:
        storage.write_bytes_atomic(stage1_uri(out, key, ".stats.json"), json.dumps(stats, indent=1).encode(), ep)
        storage.write_bytes_atomic(ledger_uri(out, key, gen + 1), table_bytes(table), ep)
        storage.delete(current, ep)
    if not stats["retryable"]:
        storage.delete(marker, ep)
    return {"unit": key, "skipped": False, "stats": json.dumps(stats), "retried": retried, "changed": changed}
