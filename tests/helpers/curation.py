"""Test-side tools for the curation job's outputs and stages, written beside the tests that use them because the job
itself never needs them: a blocking fetch of a URL list (the job streams with crawl.iter_fetch), the kept rows of
a curate output as one table (the job reads them as a Ray Dataset, curate_schema.read_kept), and the exhaustive
near-duplicate search the LSH is checked against."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.curate_schema import CURATED_SCHEMA, check_schema, shard_files
from pipelines.curation.crawl import FetchResult, iter_fetch
from pipelines.curation.lsh import as_u64, popcount
from vosr import storage


def fetch_urls(urls: list[str], crawl_cfg, shared_gates=None) -> list[FetchResult]:
    """Fetch a list of URLs with the crawl's own fetcher (blocking); results in input order, one per URL."""
    out: list[FetchResult | None] = [None] * len(urls)
    for i, res in iter_fetch(urls, crawl_cfg, shared_gates):
        out[i] = res
    return out  # type: ignore[return-value]


def read_kept_table(uri: str, endpoint_url: str = "", columns: list[str] | None = None) -> pa.Table:
    """All kept rows of a curate output root as one pyarrow table (small outputs; no Ray)."""
    tables = []
    for f in shard_files(uri, endpoint_url):
        t = pq.read_table(io.BytesIO(storage.read_bytes(f, endpoint_url)))
        check_schema(t.schema)
        t = t.filter(pc.equal(t["kept"], True))
        tables.append(t.select(columns) if columns else t)
    if not tables:
        schema = CURATED_SCHEMA if not columns else pa.schema([CURATED_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables)


def brute_force_pairs(hashes, k: int, chunk: int = 2048) -> set[tuple[int, int]]:
    """All index pairs within Hamming distance k by exhaustive comparison (vectorised popcount in chunks)."""
    u = as_u64(hashes)
    n = len(u)
    found: set[tuple[int, int]] = set()
    for s in range(0, n, chunk):
        block = u[s:s + chunk]
        d = popcount(block[:, None] ^ u[None, :])
        i, j = np.nonzero(d <= k)
        i = i + s
        keep = i < j
        found.update(zip(i[keep].tolist(), j[keep].tolist()))
    return found
