"""Listing folders and s3:// prefixes for curation without holding their files on the driver.

A folder source is listed by tasks (Ray tasks in the curate job, plain calls elsewhere), never by the driver:
one task lists the source's top level, then one task per top-level subdirectory lists that subtree. A task streams
what it finds (S3: ListObjectsV2 pages in key order; local: os.walk with sorted names) and sorts it by kind:

- image files go into listing manifests: Parquet files of paths (MANIFEST_SCHEMA) of `part_rows(rows_per_unit)` rows
  each, written with row groups of exactly `rows_per_unit` rows, so a stage-1 unit (a run of rows_per_unit
  images) reads one row group of one manifest and nothing else. A manifest is named by the SHA-256 of its paths,
  so the unit that references it (its key hashes the manifest's name and its row range) is content-addressed: the
  same files listed again give the same units, and a re-run resumes;
- tar shards (.tar) and URL lists (.txt/.csv/.tsv/.parquet) come back as their (URI, size): each becomes one or
  more units, so the driver holds them as it holds units. A .parquet beside a .tar of the same stem is
  img2dataset's per-shard status table, not a URL list, and is left out.

What reaches the driver is therefore per unit, per manifest and per top-level subdirectory, never per image file:
`listing_peak_bytes` states the driver's bound, `listing_task_peak_bytes` a listing task's (declared to Ray as the
task's memory). Names holding ".tmp-" (temporaries of a writer) are skipped.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from vosr import storage
from vosr.imageio import IMAGE_SUFFIXES

LIST_SUFFIXES = (".txt", ".csv", ".tsv", ".parquet")
TAR_SUFFIXES = (".tar",)
MANIFEST_SCHEMA = pa.schema([pa.field("path", pa.string(), nullable=False)])
MANIFEST_DIR = "files"          # under the listing work folder: <workdir>/files/<sha256>.parquet
PART_ROWS_TARGET = 65_536       # a manifest holds about this many paths (a whole number of units)

# Constants of the bounds below: a Unit with its key and its row for the stage-1 task on the driver (tracemalloc:
# 0.9 KiB for a listed-files unit, 1.3 KiB for a Parquet unit carrying two metadata columns; 2 KiB stated, with
# room for stage 2's per-block records); a manifest or subdirectory record; a path held by a listing task (str
# object + list slot + the Arrow copy written). benchmarks/bench_listing.py prints the driver's growth per file.
UNIT_DRIVER_BYTES = 2_048
RECORD_DRIVER_BYTES = 512
PATH_TASK_BYTES = 400
TASK_BASE_BYTES = 96 * 2**20    # interpreter, pyarrow and the S3 client of a listing task


def part_rows(rows_per_unit: int) -> int:
    """Rows per listing manifest: a whole number of units, about PART_ROWS_TARGET paths (at least one unit)."""
    return rows_per_unit * max(1, -(-PART_ROWS_TARGET // rows_per_unit))


def listing_peak_bytes(units: int, manifests: int = 0, subdirs: int = 0) -> int:
    """The driver's memory for planning the inputs, stated: per unit its descriptor, key and task row
    (UNIT_DRIVER_BYTES), per listing manifest and per top-level subdirectory a small record. The number of image
    files enters only through the number of units (files / rows_per_unit) and of manifests (files / part_rows)."""
    return UNIT_DRIVER_BYTES * units + RECORD_DRIVER_BYTES * (manifests + subdirs)


def listing_task_peak_bytes(rows_per_unit: int, largest_local_dir: int = 0, units_in_subtree: int = 0) -> int:
    """A listing task's memory, stated: one manifest's paths (part_rows) held while it is written, plus, for a
    local folder, the names of its largest directory (os.walk sorts one directory's names at a time; S3 listings
    stream in key order and hold one page of 1,000 keys), plus the tar shards and URL lists found in the subtree
    (one record each: they are units), plus a fixed base."""
    return (TASK_BASE_BYTES + PATH_TASK_BYTES * (part_rows(rows_per_unit) + largest_local_dir)
            + UNIT_DRIVER_BYTES * units_in_subtree)


# ------------------------------------------------------------------------------------------- brace patterns

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def has_braces(uri: str) -> bool:
    m = _BRACE.search(uri)
    return bool(m and ("," in m.group(1) or _RANGE.match(m.group(1))))


def expand_braces(pattern: str) -> list[str]:
    """Bash-style expansion, as WebDataset shard lists are written: `{00000..00099}` (a numeric range, padded to
    the width of its first bound when that has leading zeros), `{a,b,c}` (alternatives); several groups expand as
    their product, left to right. A group that is neither (`{}`, `{x}`) is kept as written."""
    m = None
    for cand in _BRACE.finditer(pattern):
        if "," in cand.group(1) or _RANGE.match(cand.group(1)):
            m = cand
            break
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = _RANGE.match(body)
    if r:
        a, b = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).lstrip("-").startswith("0") and len(r.group(1)) > 1 else 0
        step = 1 if b >= a else -1
        options = [str(i).zfill(width) for i in range(a, b + step, step)]
    else:
        options = body.split(",")
    return [x for opt in options for x in expand_braces(head + opt + tail)]


# ------------------------------------------------------------------------------------------- listing tasks

@dataclass
class Listing:
    """What one listing task found: subdirectories (top-level task only), manifests of image paths as
    [uri, rows], tar shards and URL lists as [uri, size], in listing order."""

    subdirs: list[str] = field(default_factory=list)
    manifests: list[list] = field(default_factory=list)
    tars: list[list] = field(default_factory=list)
    lists: list[list] = field(default_factory=list)


def _kind(name: str) -> str:
    low = name.lower()
    if low.endswith(IMAGE_SUFFIXES):
        return "image"
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(LIST_SUFFIXES):
        return "list"
    return ""


def _s3_client(endpoint_url: str):
    import botocore.session

    endpoint = storage.s3_storage_options(endpoint_url).get("client_kwargs", {}).get("endpoint_url")
    session = botocore.session.get_session()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    return session.create_client("s3", endpoint_url=endpoint or None, region_name=region)


def _iter_s3(uri: str, recursive: bool, endpoint_url: str) -> Iterator[tuple[str, str, int]]:
    """("file", uri, size) in key order and ("dir", uri, 0) for common prefixes, one page (1,000 keys) at a time."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    kw = {"Bucket": bucket, "Prefix": prefix}
    if not recursive:
        kw["Delimiter"] = "/"
    for page in _s3_client(endpoint_url).get_paginator("list_objects_v2").paginate(**kw):
        for p in page.get("CommonPrefixes", []) or []:
            yield "dir", f"s3://{bucket}/{p['Prefix'].rstrip('/')}", 0
        for obj in page.get("Contents", []) or []:
            if not obj["Key"].endswith("/"):
                yield "file", f"s3://{bucket}/{obj['Key']}", int(obj["Size"])


def _iter_local(path: str, recursive: bool) -> Iterator[tuple[str, str, int]]:
    """("file", path, size) and ("dir", path, 0): one directory's names sorted at a time (os.walk, top-down)."""
    if not recursive:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.is_dir(follow_symlinks=True):
                yield "dir", e.path, 0
            elif e.is_file(follow_symlinks=True):
                yield "file", e.path, e.stat().st_size
        return
    for root, dirs, files in os.walk(path, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                size = os.stat(full).st_size
            except OSError:
                continue
            yield "file", full, size


class _ManifestWriter:
    """Image paths into content-addressed manifests of part_rows rows, row groups of rows_per_unit rows."""

    def __init__(self, workdir: str, rows_per_unit: int, endpoint_url: str):
        self.folder = storage.join(workdir, MANIFEST_DIR)
        self.rows_per_unit = rows_per_unit
        self.part = part_rows(rows_per_unit)
        self.endpoint_url = endpoint_url
        self.paths: list[str] = []
        self.out: list[list] = []

    def add(self, path: str) -> None:
        self.paths.append(path)
        if len(self.paths) >= self.part:
            self.flush()

    def flush(self) -> None:
        if not self.paths:
            return
        digest = hashlib.sha256("\n".join(self.paths).encode()).hexdigest()[:32]
        uri = storage.join(self.folder, f"{digest}.parquet")
        if not storage.exists(uri, self.endpoint_url):
            fs, path = storage.open_fs(uri, self.endpoint_url)
            parent = posixpath.dirname(path) if storage.is_remote(uri) else os.path.dirname(path)
            fs.create_dir(parent, recursive=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with fs.open_output_stream(tmp) as f:
                pq.write_table(pa.table({"path": self.paths}, schema=MANIFEST_SCHEMA), f,
                               row_group_size=self.rows_per_unit, compression="zstd")
            fs.move(tmp, path)
        self.out.append([uri, len(self.paths)])
        self.paths = []


def list_dir(uri: str, recursive: bool, workdir: str, rows_per_unit: int, endpoint_url: str = "") -> Listing:
    """One listing task: the files of `uri` (its whole subtree when recursive, else its top level, returning its
    subdirectories), image paths streamed into manifests. Memory: listing_task_peak_bytes."""
    found = Listing()
    writer = _ManifestWriter(workdir, rows_per_unit, endpoint_url)
    if uri.startswith("s3://"):
        entries = _iter_s3(uri, recursive, endpoint_url)
    else:
        entries = _iter_local(storage.open_fs(uri)[1], recursive)
    for what, path, size in entries:
        if what == "dir":
            found.subdirs.append(path)
            continue
        if ".tmp-" in path.rsplit("/", 1)[-1]:
            continue
        kind = _kind(path)
        if kind == "image":
            writer.add(path)
        elif kind == "tar":
            found.tars.append([path, size])
        elif kind == "list":
            found.lists.append([path, size])
    writer.flush()
    found.manifests = writer.out
    tar_stems = {t[0].rsplit(".", 1)[0] for t in found.tars}
    found.lists = [x for x in found.lists
                   if not (x[0].lower().endswith(".parquet") and x[0].rsplit(".", 1)[0] in tar_stems)]
    return found


Runner = Callable[[Callable, list[tuple], int], list]


def local_runner(fn: Callable, calls: list[tuple], memory: int = 0) -> list:
    """Run tasks in this process, in order (tests, benchmarks, small jobs); the curate job passes a Ray runner."""
    return [fn(*args) for args in calls]


def list_source(uri: str, workdir: str, rows_per_unit: int, endpoint_url: str = "",
                runner: Runner = local_runner) -> Listing:
    """A folder or prefix listed by tasks: its top level, then each top-level subdirectory's subtree. The result
    keeps listing order: the top level's entries first, then each subdirectory's (sorted by name)."""
    mem = listing_task_peak_bytes(rows_per_unit)
    top = runner(list_dir, [(uri, False, workdir, rows_per_unit, endpoint_url)], mem)[0]
    subs = runner(list_dir, [(d, True, workdir, rows_per_unit, endpoint_url) for d in sorted(top.subdirs)], mem)
    out = Listing(subdirs=list(top.subdirs), manifests=list(top.manifests), tars=list(top.tars),
                  lists=list(top.lists))
    for s in subs:
        out.manifests += s.manifests
        out.tars += s.tars
        out.lists += s.lists
    return out
