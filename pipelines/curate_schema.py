"""Versioned schema of curated shards (the contract between curate and precompute).

Layout under the output root (a folder or an s3:// prefix):

    summary.json                      run summary: counts by reason, throughput, shard list
    shards/part-<key>.parquet         curated rows (CURATED_SCHEMA), one shard per input block
    shards/part-<key>.stats.json      per-shard stats (seen, fetched, failed/filtered by reason, duplicates, kept);
                                      written after its shard, it is the shard's commit marker
    _stage1/<key>.parquet             stage-1 ledger: every input row with its outcome (STAGE1_SCHEMA)
    _stage1/<key>.stats.json          stage-1 counts of that block
    _stage1/<key>.g<n>.parquet        the same ledger after the n-th re-run that re-fetched transient failures
    _stage1/<key>.retry               marker: that block's latest ledger still holds retryable failures
    _stage2.json                      fingerprint of the latest stage-2 decisions (each shard's stats JSON
                                      carries the fingerprint it was written with; a re-run skips a shard
                                      only when that matches, so a changed config never leaves stale shards)

Choice on dropped rows: every image that passed decoding and the quality filters has a row in the final
shards. Rows kept for training have `kept = true` and `duplicate_of = null`. Near/exact duplicates have
`kept = false`, `duplicate_of = <id of the kept representative>` and `drop_reason = "duplicate"`; rows cut by
the per-category cap have `kept = false`, `drop_reason = "category_cap"`. Dropped rows carry no image bytes
(`image = null`) to save storage; the bytes stay in `_stage1/` for a re-run with other settings. Inputs that
failed to fetch or decode or were filtered out appear only in `_stage1/` and in the stats.

Representative of a duplicate group (pipelines/curation/dedup.py `node_key`, the one place it is decided): the
member with the most native pixels (width x height / native_scale^2, where `native_scale` is stage 1's estimate of
how much the image was enlarged from its source, 1.0 for a native image), counted at the steps of
dedup.SCALE_STEPS and with an estimated enlargement discounted once more (dedup.rank_pixels: an enlarged copy
carries no more detail than its source, so raw pixel count never decides alone); then the least lossy encoding
(`fidelity`, higher first: 100 for lossless true colour; a JPEG its quality estimated from the quantisation tables;
lossy WebP 50; CMYK storage at most 50 and palette/bilevel storage such as palette PNG or GIF at most 40, so a
palette or CMYK re-encode of an RGB original never beats it); then the earliest input position (the block's
position in the plan of curate.sources, then the row inside it), so of byte-identical copies the first occurrence
is kept. The numbers are in docs/curation-quality.md.

Schema versions: 1 (initial); 2 adds `sharpness` and `fidelity` to both schemas and `declared_type` (the
Content-Type the server declared, null for files; what is decoded is decided from the bytes) to the ledger; 3 adds
`metadata` to both: the columns of a URL list (or the fields of a tar sample's JSON and small members) named in
curate.columns.metadata, as one JSON object per row (null when none are carried); 4 adds `native_scale`
(analysis.native_scale) to both; `sharpness` is null unless curate.filters.min_sharpness is on (it is computed only
for that filter).

Readers use `read_kept(uri)` (a Ray Dataset of the kept rows).
"""

from __future__ import annotations

import pyarrow as pa

from vosr import storage

SCHEMA_VERSION = 4
SCHEMA_VERSION_KEY = b"vosr.curate.schema_version"

CURATED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),       # content-derived id: blake2b(bytes sha256 | source)
        pa.field("source", pa.string()),                   # URL or file URI
        pa.field("image", pa.binary()),                    # original encoded bytes (null for dropped rows)
        pa.field("format", pa.string()),                   # jpeg, png, webp, ...
        pa.field("width", pa.int32()),                     # after EXIF orientation
        pa.field("height", pa.int32()),
        pa.field("sha256", pa.string()),                   # of the decoded RGB pixels (exact dedup key)
        pa.field("phash", pa.int64()),                     # 64-bit pHash, bits as signed int64
        pa.field("dhash", pa.int64()),                     # 64-bit dHash, bits as signed int64
        pa.field("gradient", pa.float32()),                # mean gradient magnitude (0-255) at analysis size
        pa.field("entropy", pa.float32()),                 # grey-level entropy (bits)
        pa.field("native_scale", pa.float32()),            # estimated enlargement factor (analysis.native_scale)
        pa.field("sharpness", pa.float32()),               # native_sharpness; null unless filters.min_sharpness is on
        pa.field("fidelity", pa.float32()),                # encoding fidelity 0-100 (analysis.encoding_fidelity)
        pa.field("category", pa.string()),                 # from the source list, else "cluster-<k>"
        pa.field("category_source", pa.string()),          # "list" | "kmeans" | "none"
        pa.field("duplicate_of", pa.string()),             # null for kept rows
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("drop_reason", pa.string()),              # null | "duplicate" | "category_cap"
        pa.field("metadata", pa.string()),                 # carried columns (curate.columns.metadata), JSON
    ],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)

STAGE1_SCHEMA = pa.schema(
    [
        pa.field("unit", pa.string(), nullable=False),     # key of the input block
        pa.field("row", pa.int32(), nullable=False),       # position inside the block
        pa.field("source", pa.string()),
        pa.field("reason", pa.string(), nullable=False),   # "ok" or the failure / filter code
        pa.field("detail", pa.string()),
        pa.field("list_category", pa.string()),            # category column of the URL list, if any
        pa.field("id", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("phash", pa.int64()),
        pa.field("dhash", pa.int64()),
        pa.field("gradient", pa.float32()),
        pa.field("entropy", pa.float32()),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("native_scale", pa.float32()),
        pa.field("sharpness", pa.float32()),
        pa.field("fidelity", pa.float32()),
        pa.field("declared_type", pa.string()),            # Content-Type declared by the server (URLs only)
        pa.field("metadata", pa.string()),                 # carried columns (curate.columns.metadata), JSON
    ],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)

SHARDS_DIR = "shards"
STAGE1_DIR = "_stage1"
SUMMARY_FILE = "summary.json"
STAGE2_FILE = "_stage2.json"
STATS_SUFFIX = ".stats.json"


def shard_files(uri: str, endpoint_url: str = "") -> list[str]:
    """The committed final shard files under a curate output root, sorted (fresh listing, no cached s3 entries).
    In a curate job's output (one with _stage2.json) a shard is committed by its stats JSON, written after it
    (pipelines/curation/writer.py): a shard without one was cut off by a kill and is not listed. A folder of shards
    made otherwise (no _stage2.json) lists every .parquet."""
    files = storage.list_files(storage.join(uri, SHARDS_DIR), endpoint_url=endpoint_url)
    shards = [f for f in files if f.endswith(".parquet")]
    if not storage.exists(storage.join(uri, STAGE2_FILE), endpoint_url):
        return shards
    committed = set(files)
    return [f for f in shards if f[:-len(".parquet")] + STATS_SUFFIX in committed]


def _reader_fs(uri: str, endpoint_url: str):
    """(pyarrow filesystem, path) for reading shards; on S3 an s3fs without instance or listing caches, so a
    shard rewritten since an earlier read in any process is read afresh."""
    if not uri.startswith("s3://"):
        return storage.open_fs(uri, endpoint_url)
    import pyarrow.fs as pafs
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                           **storage.s3_storage_options(endpoint_url))
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), uri[len("s3://"):]


def check_schema(schema: pa.Schema) -> None:
    """Raise a clear error if a shard was written with another schema version."""
    meta = schema.metadata or {}
    version = meta.get(SCHEMA_VERSION_KEY)
    if version is None or int(version) != SCHEMA_VERSION:
        raise ValueError(f"curated shard has schema version {version!r}, this code reads {SCHEMA_VERSION}")
    missing = [f.name for f in CURATED_SCHEMA if f.name not in schema.names]
    if missing:
        raise ValueError(f"curated shard lacks columns {missing}")


def read_kept(uri: str, endpoint_url: str = "", columns: list[str] | None = None):
    """Kept rows of a curate output root as a Ray Dataset (streams; nothing gathered on the driver)."""
    import ray.data
    from ray.data.expressions import col, lit

    files = shard_files(uri, endpoint_url)
    if not files:
        raise FileNotFoundError(f"no curated shards under {storage.join(uri, SHARDS_DIR)}")
    fs, _ = _reader_fs(files[0], endpoint_url)
    paths = [_reader_fs(f, endpoint_url)[1] for f in files]
    ds = ray.data.read_parquet(paths, filesystem=fs)
    if columns:
        ds = ds.select_columns(sorted(set(columns) | {"kept"}))
    ds = ds.filter(expr=col("kept") == lit(True))  # right after the read: pushed into the Parquet scan
    if columns and "kept" not in columns:
        ds = ds.select_columns(columns)
    return ds
