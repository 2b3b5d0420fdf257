"""Stage 1 of curation, one input block at a time: fetch (HTTP or storage) -> safe decode -> quality filters ->
hashes and embedding. Every input row ends in the block's ledger shard with "ok" or its failure/filter reason;
the shard is written atomically and names the block, so a re-run skips finished blocks.

Re-runs retry transient failures (crawl.retry_next_run: timeouts, 429, 5xx, connection errors). Files under
_stage1/ for block <key>:
    <key>.parquet          ledger, generation 0 (the first complete pass)
    <key>.g<n>.parquet     ledger, generation n: a re-run re-fetched its retryable rows and something changed
    <key>.retry            marker: the latest ledger still has retryable rows (written before that ledger)
    <key>.stats.json       counts of the latest ledger
    <key>.attempt          attempts of the block begun and not finished (a kill leaves it behind; each one
                           makes the next attempt lighter, see _lighter_after_kills); removed when it finishes
A retry pass writes generation n+1 (atomically), then deletes generation n, then drops the marker when nothing
retryable is left; a run killed between these steps leaves states the next run resolves (highest generation
wins, stale generations are deleted, a marker without a ledger is ignored). Generations enter the stage-2
fingerprint, so final shards made from older ledgers are never kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.curate_schema import STAGE1_DIR, STAGE1_SCHEMA
from pipelines.curation.analysis import Rejected, analyse
from pipelines.curation.crawl import FetchResult, iter_fetch, retry_next_run
from pipelines.curation.sources import Item, Unit, prefilter, read_items
from vosr import storage

# Reasons that mean "an image was received and decoded but a quality filter removed it" (paper s4.1).
FILTER_REASONS = ("too_small", "bad_aspect", "low_gradient", "low_entropy", "upscaled", "low_sharpness",
                  "prefilter_too_small", "prefilter_bad_aspect")
# Filter reasons decided from the size a URL list declares, before any request (sources.prefilter): never fetched.
PREFILTER_REASONS = ("prefilter_too_small", "prefilter_bad_aspect")


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


def _fetch_file(it: Item, max_bytes: int, endpoint_url: str) -> FetchResult:
    try:
        fs, path = storage.open_fs(it.source, endpoint_url)
        size = fs.get_file_info(path).size
        if size is not None and size > max_bytes:
            return FetchResult(it.source, "oversize", None, f"{size} bytes > {max_bytes}")
        with fs.open_input_stream(path) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            return FetchResult(it.source, "oversize", None, f"> {max_bytes} bytes")
        return FetchResult(it.source, "ok", data, attempts=1)
    except (OSError, ValueError) as exc:
        return FetchResult(it.source, "read_error", None, f"{type(exc).__name__}: {str(exc)[:200]}")


def _fetch(unit: Unit, items: list[Item], ccfg, gates=None) -> Iterator[tuple[Item, FetchResult]]:
    """(item, result) per item, as each body arrives (URLs: completion order; files: in order). At most
    crawl.concurrency bodies are held by the fetching side at once (crawl.iter_fetch)."""
    if unit.kind in ("files", "image"):
        for it in items:
            yield it, _fetch_file(it, ccfg.crawl.max_bytes, ccfg.s3_endpoint_url)
        return
    for i, res in iter_fetch([it.source for it in items], ccfg.crawl, gates):
        yield items[i], res


def _ledger_row(key: str, it: Item, res: FetchResult, ccfg) -> dict:
    """One ledger row: "ok" with image, hashes and embedding, or the failure/filter reason."""
    row = {"unit": key, "row": it.index, "source": it.source, "list_category": it.category,
           "declared_type": res.content_type or None,  # recorded only: the bytes decide (imageio.sniff)
           "metadata": it.metadata}
    if res.reason != "ok":
        return {**row, "reason": res.reason, "detail": res.detail}
    data = res.data or b""
    try:
        a = analyse(data, ccfg.filters)
    except Rejected as rej:
        return {**row, "reason": rej.reason, "detail": rej.detail}
    return {**row, "reason": "ok", "detail": "", "id": row_id(data, it.source), "image": data,
            "format": a.format, "width": a.width, "height": a.height, "sha256": a.sha256,
            "phash": a.phash, "dhash": a.dhash, "gradient": a.gradient, "entropy": a.entropy,
            "embedding": a.embedding.tolist(), "native_scale": a.native_scale, "sharpness": a.sharpness,
            "fidelity": a.fidelity}


def reason_counts(reasons: list[str]) -> dict:
    """The ledger counting rule, the one place it lives: seen, fetched (a body arrived: every reason but the fetch
    failures; a decode failure had a body), ok, failed and filtered by reason."""
    from vosr.imageio import DECODE_REASONS

    counts = Counter(reasons)
    ok = counts.pop("ok", 0)
    filtered = {r: n for r, n in counts.items() if r in FILTER_REASONS}
    failed = {r: n for r, n in counts.items() if r not in FILTER_REASONS}
    not_fetched = (sum(n for r, n in failed.items() if r not in DECODE_REASONS)
                   + sum(n for r, n in filtered.items() if r in PREFILTER_REASONS))
    return {"seen": len(reasons), "fetched": len(reasons) - not_fetched, "ok": ok,
            "failed": dict(sorted(failed.items())), "filtered": dict(sorted(filtered.items()))}


def ledger_stats(key: str, reasons: list[str], seconds: float) -> dict:
    """Counts of one block's ledger (reason_counts), its retryable rows and its stage-1 seconds."""
    counts = reason_counts(reasons)
    return {"unit": key, **counts, "retryable": sum(n for r, n in counts["failed"].items() if retry_next_run(r)),
            "seconds": round(seconds, 4)}


def stage1_peak_bytes(ccfg) -> int:
    """The stated bound on one block's stage-1 working memory, whatever rows_per_shard is: the bodies the crawl
    holds (crawl.concurrency in flight or waiting, each up to crawl.max_bytes, plus the one copy made as a body
    completes on the crawl's event loop), the ledger rows buffered for one row group (stage1_buffer_mb) three times (the rows, the
    Arrow table, the encoded pages), and one decode at the pixel cap (RGB pixels plus the copy hashed)."""
    c = ccfg.crawl
    return ((c.concurrency + 1) * c.max_bytes + 3 * ccfg.stage1_buffer_mb * 2**20
            + 2 * 3 * ccfg.filters.max_pixels)


PAGE_VALUES = 1  # values per write batch: a page holds at most ~1 MiB plus one image (as fast as 16; 1,024 is slower)


def streamable_pages(schema: pa.Schema) -> dict:
    """ParquetWriter settings for files of images that readers can stream page by page: no dictionary on binary
    columns and small write batches. By default a dictionary is tried on every column (for a row group of
    distinct images it grows to the whole row group before the writer falls back), and the page-size limit is
    checked only every 1,024 values (a row group of fewer images is one page): a reader then has to load a whole
    row group's images at once (measured: a 29 MiB ledger's image column was one 29 MiB dictionary page, then
    one 29 MiB data page)."""
    return {"use_dictionary": [f.name for f in schema if not pa.types.is_binary(f.type)],
            "write_batch_size": PAGE_VALUES}


class LedgerWriter:
    """Streams ledger rows to a Parquet file in row groups of about `group_bytes` of image bytes, under a
    temporary name; commit() renames it into place (readers never see a partial ledger), abort() removes it.
    A block's memory therefore holds one row group, not the whole block."""

    def __init__(self, uri: str, endpoint_url: str, group_bytes: int):
        self._fs, self._path = storage.open_fs(uri, endpoint_url)
        parent = posixpath.dirname(self._path) if storage.is_remote(uri) else os.path.dirname(self._path)
        self._fs.create_dir(parent, recursive=True)
        self._tmp = f"{self._path}.tmp-{uuid.uuid4().hex}"
        self._stream = self._fs.open_output_stream(self._tmp)
        self._writer = pq.ParquetWriter(self._stream, STAGE1_SCHEMA, compression="zstd",
                                        **streamable_pages(STAGE1_SCHEMA))
        self._group_bytes = max(1, group_bytes)
        self._rows: list[dict] = []
        self._bytes = 0
        self.reasons: list[str] = []

    def add(self, row: dict) -> None:
        self._rows.append(row)
        self.reasons.append(row["reason"])
        self._bytes += len(row.get("image") or b"") + len(row.get("metadata") or "") + 512
        if self._bytes >= self._group_bytes:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=STAGE1_SCHEMA))
            self._rows, self._bytes = [], 0

    def commit(self) -> None:
        self.flush()
        self._writer.close()
        self._stream.close()
        self._fs.move(self._tmp, self._path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(Exception):
            self._stream.close()
        with contextlib.suppress(Exception):
            self._fs.delete_file(self._tmp)


def process_unit(unit: Unit, key: str, ccfg, sink: LedgerWriter, gates=None) -> dict:
    """Run stage 1 on one block, streaming its ledger rows (STAGE1_SCHEMA) into `sink`; returns the stats. Rows of
    a URL list whose declared size fails the resolution or aspect filter are decided without a request
    (curate.prefilter); a tar shard is streamed sample by sample (tars.py)."""
    t0 = time.perf_counter()
    if unit.kind == "tar":
        from pipelines.curation.tars import iter_tar

        for it, res in iter_tar(unit, ccfg.crawl.max_bytes, ccfg.s3_endpoint_url):
            sink.add(_ledger_row(key, it, res, ccfg))
        return ledger_stats(key, sink.reasons, time.perf_counter() - t0)
    items = _decide_listed(key, list(read_items(unit, ccfg.s3_endpoint_url)), ccfg, sink)
    for it, res in _fetch(unit, items, ccfg, gates):
        sink.add(_ledger_row(key, it, res, ccfg))
    return ledger_stats(key, sink.reasons, time.perf_counter() - t0)


def _decide_listed(key: str, items: list[Item], ccfg, sink: LedgerWriter) -> list[Item]:
    """Ledger rows for the items whose listed size fails a filter; returns the items left to fetch."""
    if not ccfg.prefilter:
        return items
    left = []
    for it in items:
        decided = prefilter(it, ccfg.filters)
        if decided is None:
            left.append(it)
        else:
            sink.add({"unit": key, "row": it.index, "source": it.source, "list_category": it.category,
                      "declared_type": None, "metadata": it.metadata, "reason": decided[0], "detail": decided[1]})
    return left


_COMPARED = [f.name for f in STAGE1_SCHEMA if f.name not in ("detail", "image")]


def retry_unit(unit: Unit, key: str, current_uri: str, ccfg, sink: LedgerWriter,
               gates=None) -> tuple[dict, int, bool]:
    """Fetch again the rows of a finished ledger that failed with a retryable reason, streaming the new ledger
    into `sink`: the fresh rows first, then (only when something changed) the other rows copied row group by row
    group. Returns (stats of the new ledger, rows retried, changed). Finished rows are never fetched again."""
    t0 = time.perf_counter()
    fs, path = storage.open_fs(current_uri, ccfg.s3_endpoint_url)
    with fs.open_input_file(path) as f:
        small = pq.read_table(f, columns=_COMPARED)  # no image bytes
    old = {r["row"]: r for r in small.to_pylist() if retry_next_run(r["reason"])}
    if not old or unit.kind == "tar":  # a shard's reasons are final (storage, not a server, failed)
        return ledger_stats(key, small["reason"].to_pylist(), 0.0), 0, False
    items = [it for it in read_items(unit, ccfg.s3_endpoint_url) if it.index in old]
    if len(items) != len(old):
        raise RuntimeError(f"block {key}: the input changed under its ledger ({len(items)} of {len(old)} rows "
                           "to retry found); use a new output or remove its _stage1/")
    changed = False
    for it, res in _fetch(unit, items, ccfg, gates):
        row = _ledger_row(key, it, res, ccfg)
        prev = old[it.index]
        changed |= any(row.get(c) != prev[c] for c in _COMPARED if c != "embedding") or (
            row.get("embedding") is not None and prev["embedding"] is None)
        sink.add(row)
    if changed:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.metadata.num_row_groups):
                part = pf.read_row_group(g)
                keep = pc.invert(pc.is_in(part["row"], value_set=pa.array(list(old), pa.int32())))
                for r in part.filter(keep).to_pylist():
                    sink.add(r)
    reasons = [r for r, row in zip(small["reason"].to_pylist(), small["row"].to_pylist()) if row not in old]
    stats = ledger_stats(key, reasons + sink.reasons[:len(old)], time.perf_counter() - t0)
    return stats, len(old), changed


def run_unit(unit: Unit, key: str, ccfg, gen: int = -1, gates=None) -> dict:
    """Stage 1 of one block. gen < 0: first pass, unless its ledger exists (then skipped). gen >= 0: retry pass
    over the retryable rows of ledger generation `gen` (see the module docstring for the file protocol).
    gates: the crawl-wide per-domain limiter (politeness.SharedGates) or None."""
    ep = ccfg.s3_endpoint_url
    out = ccfg.output
    marker = stage1_uri(out, key, ".retry")
    if gen < 0:
        shard = ledger_uri(out, key)
        if storage.exists(shard, ep):
            return {"unit": key, "skipped": True, "stats": "", "retried": 0, "changed": False}
    ccfg, scale = _lighter_after_kills(ccfg, key)
    group_bytes = ccfg.stage1_buffer_mb * 2**20
    if gen < 0:
        sink = LedgerWriter(shard, ep, group_bytes)
        try:
            stats = process_unit(unit, key, ccfg, sink, gates)
        except BaseException as exc:
            _failed(sink, ccfg, key, exc)
            raise
        if stats["retryable"] and ccfg.retry_failed:
            storage.write_bytes_atomic(marker, b"", ep)
        storage.write_bytes_atomic(stage1_uri(out, key, ".stats.json"), json.dumps(stats, indent=1).encode(), ep)
        sink.commit()
        storage.delete(stage1_uri(out, key, ".attempt"), ep)
        return {"unit": key, "skipped": False, "stats": json.dumps(stats), "retried": 0, "changed": True,
                "scale": scale}
    current = ledger_uri(out, key, gen)
    sink = LedgerWriter(ledger_uri(out, key, gen + 1), ep, group_bytes)
    try:
        stats, retried, changed = retry_unit(unit, key, current, ccfg, sink, gates)
    except BaseException as exc:
        _failed(sink, ccfg, key, exc)
        raise
    storage.delete(stage1_uri(out, key, ".attempt"), ep)
    if changed:
        storage.write_bytes_atomic(stage1_uri(out, key, ".stats.json"), json.dumps(stats, indent=1).encode(), ep)
        sink.commit()
        storage.delete(current, ep)
    else:
        sink.abort()
    if not stats["retryable"]:
        storage.delete(marker, ep)
    return {"unit": key, "skipped": False, "stats": json.dumps(stats), "retried": retried, "changed": changed,
            "scale": scale}


def _lighter_after_kills(ccfg, key: str):
    """A block's attempt marker (_stage1/<key>.attempt) counts its attempts that were killed before finishing
    (a process killed for memory never reaches an except clause). Each such attempt halves the block's crawl
    concurrency and row-group buffer for the next one (Ray's retry of an OOM-killed task, or a re-run of the job),
    so a block that ran out of memory does not fail again the same way. Returns (config to use, divisor)."""
    ep = ccfg.s3_endpoint_url
    uri = stage1_uri(ccfg.output, key, ".attempt")
    try:
        killed = int(storage.read_bytes(uri, ep).decode() or 0)
    except (OSError, ValueError):
        killed = 0
    storage.write_bytes_atomic(uri, str(killed + 1).encode(), ep)
    if not killed:
        return ccfg, 1
    fs, folder = storage.open_fs(storage.join(ccfg.output, STAGE1_DIR), ep)
    for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        name = PurePosixPath(info.path).name
        if name.startswith(key + ".") and ".tmp-" in name:  # the partial ledger of a killed attempt
            with contextlib.suppress(OSError):
                fs.delete_file(info.path)
    scale = 2 ** min(killed, 6)
    crawl = dataclasses.replace(ccfg.crawl, concurrency=max(1, ccfg.crawl.concurrency // scale))
    lighter = dataclasses.replace(ccfg, crawl=crawl, stage1_buffer_mb=max(1, ccfg.stage1_buffer_mb // scale))
    print(f"[curate] stage 1 block {key}: {killed} earlier attempt(s) were killed before finishing; running with "
          f"crawl concurrency {crawl.concurrency} and a {lighter.stage1_buffer_mb} MiB row-group buffer", flush=True)
    return lighter, scale


def _failed(sink: LedgerWriter, ccfg, key: str, exc: BaseException) -> None:
    """An attempt that ends with an exception (not a kill) removes its partial ledger and, unless the exception
    is itself a MemoryError, its attempt marker: only kills and memory errors make the next attempt lighter."""
    sink.abort()
    if not isinstance(exc, MemoryError):
        with contextlib.suppress(OSError):
            storage.delete(stage1_uri(ccfg.output, key, ".attempt"), ccfg.s3_endpoint_url)
