"""Sources -> work units. A unit is a small, deterministic slice of the input, and the unit of resumption (its key
names its stage-1 ledger and its final shard):

    text / csv / tsv  a byte range of a URL list (.txt: url [TAB category]; .csv/.tsv with a header)
    parquet           a row range of a Parquet URL list (LAION, DataComp, img2dataset input or output, ...)
    files             a row range (one row group) of a listing manifest of image files (listing.py)
    image             one image file given as a source by itself
    tar               one WebDataset tar shard (tars.py): a shard is a unit

The driver reads file sizes, Parquet footers and CSV headers to plan units, never the URLs or image paths
themselves: folders and s3:// prefixes are listed by tasks into manifests (listing.py), so the driver's memory
grows with the number of units, not of files (listing.listing_peak_bytes). Workers read their own slice.

Columns of URL lists are matched case-insensitively by role: url, category, width and height (the image's size as
the list declares it, used to decide resolution and aspect filters before fetching), found under the names of the
common schemas (COLUMN_ROLES) or named in `curate.columns`; `curate.columns.metadata` names further columns (or, for
tar shards, keys of each sample's JSON and member fields such as `txt`) carried into the curated shards.

A Parquet list written with row groups larger than a unit (LAION's files hold ~1M-row groups) is read through a
re-chunked copy of the columns in use, made once per large row group by a streaming task (`rechunk_group`, memory
`rechunk_peak_bytes`) into `<workdir>/lists/`, one small file per unit: a unit then reads its own rows
(benchmarks/bench_url_list_read.py measures bytes read per unit), where reading the original would read its whole
row group (256x for a 4,096-row unit of a 1M-row group).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.curation import listing
from pipelines.curation.listing import LIST_SUFFIXES, TAR_SUFFIXES, Runner, local_runner
from vosr import storage
from vosr.imageio import IMAGE_SUFFIXES

# Column roles and the names the common URL-list schemas give them, in order of preference (matched without case):
# LAION (URL, TEXT, WIDTH, HEIGHT), DataComp (url, text, original_width, original_height), img2dataset input
# (url, caption) and output (url, caption, width/height after its resize, original_width/original_height).
COLUMN_ROLES = {
    "url": ("url", "image_url", "img_url"),
    "category": ("category",),
    "width": ("original_width", "width"),
    "height": ("original_height", "height"),
}
METADATA_VALUE_CHARS = 4096     # a carried string value longer than this is cut (captions, licences)


@dataclass
class Unit:
    kind: str                      # "text" | "csv" | "tsv" | "parquet" | "files" | "image" | "tar"
    uri: str = ""                  # list file, listing manifest, image or tar shard
    start: int = 0                 # byte offset (text/csv/tsv) or first row (parquet/files)
    end: int = 0                   # end byte offset (exclusive) or end row
    size: int = 0                  # list / tar file size, so an edited file gets new units (0: not known)
    part: str = ""                 # parquet: the unit's re-chunked copy, read instead of `uri` ("" = uri itself)
    cols: dict = field(default_factory=dict)  # resolved column names: url, category, width, height, metadata

    def key(self, salt: str = "") -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + "|" + salt
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def to_row(self) -> dict:
        return {"unit": json.dumps(asdict(self), sort_keys=True)}

    @staticmethod
    def from_row(row: dict) -> Unit:
        return Unit(**json.loads(row["unit"]))


@dataclass
class Item:
    """One input of a unit: a URL or a file URI, with what the list says of it (category, declared size, carried
    metadata as a JSON object)."""

    index: int
    source: str
    category: str | None = None
    width: int | None = None
    height: int | None = None
    metadata: str | None = None


class SourceError(ValueError):
    """A source that cannot be read (missing file, list without a url column)."""


def _is_list(uri: str) -> bool:
    return uri.lower().endswith(LIST_SUFFIXES)


def _columns_cfg(columns) -> dict:
    if columns is None:
        return {"url": "", "category": "", "width": "", "height": "", "metadata": []}
    if isinstance(columns, dict):
        return {"url": "", "category": "", "width": "", "height": "", "metadata": [], **columns}
    return asdict(columns)


def resolve_columns(names: list[str], columns, uri: str) -> dict:
    """Resolved column names of one list for each role (None when absent) and the metadata columns, matched
    without case. The url role is required; a name given in curate.columns must exist."""
    want = _columns_cfg(columns)
    by_low: dict[str, str] = {}
    for n in names:
        by_low.setdefault(n.strip().lower(), n)
    out: dict = {}
    for role, candidates in COLUMN_ROLES.items():
        given = (want.get(role) or "").strip()
        if given:
            if given.lower() not in by_low:
                raise SourceError(f"{uri}: curate.columns.{role} names column {given!r}, which the list does not "
                                  f"have (columns: {names})")
            out[role] = by_low[given.lower()]
        else:
            out[role] = next((by_low[c] for c in candidates if c in by_low), None)
    if out["url"] is None:
        raise SourceError(f"{uri}: a URL list needs a url column (any of {list(COLUMN_ROLES['url'])}, any case, "
                          f"or name it with curate.columns.url); it has {names}")
    meta = []
    for m in want.get("metadata") or []:
        if m.strip().lower() not in by_low:
            raise SourceError(f"{uri}: curate.columns.metadata names column {m!r}, which the list does not have "
                              f"(columns: {names})")
        meta.append([m, by_low[m.strip().lower()]])
    out["metadata"] = meta
    return out


def _read_cols(cols: dict) -> list[str]:
    names = [cols["url"]] + [cols[r] for r in ("category", "width", "height") if cols.get(r)]
    names += [src for _, src in cols.get("metadata") or []]
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------- planning

def plan_units(sources: list[str], rows_per_unit: int, endpoint_url: str = "", *, columns=None, workdir: str = "",
               runner: Runner = local_runner) -> list[Unit]:
    """All work units of the configured sources, in a stable order.

    A source is a URL list, an image, a tar shard, a brace pattern of them (`shards/{00000..00099}.tar`), or a
    folder / s3:// prefix, which is listed by tasks (listing.py) into its URL lists, tar shards and image files
    (lists first, then tars, then images; each in listing order). `workdir` (the curate job passes
    <output>/_listing) holds listing manifests and re-chunked Parquet lists; "" uses a folder under the system's
    temporary directory. `runner` runs the listing and re-chunking tasks (Ray tasks in the job).
    A source that plans no unit (an empty list, a folder with no input in it) is an error naming it."""
    workdir = workdir or os.path.join(tempfile.gettempdir(), "vosr-listing")
    units: list[Unit] = []
    for src in sources:
        found = _plan_source(src, rows_per_unit, endpoint_url, columns, workdir, runner)
        if not found:
            raise SourceError(f"source {src!r} plans no input blocks: expected a non-empty URL list "
                              f"({', '.join(LIST_SUFFIXES)}), tar shards (.tar) or image files "
                              f"({', '.join(IMAGE_SUFFIXES)}) in it")
        units.extend(found)
    return units


def _plan_source(src: str, rows: int, endpoint_url: str, columns, workdir: str, runner: Runner) -> list[Unit]:
    if listing.has_braces(src):
        out: list[Unit] = []
        files: list[list] = []
        for uri in listing.expand_braces(src):
            if uri.lower().endswith(TAR_SUFFIXES):  # not looked up: a missing shard is a counted reason
                out.append(Unit(kind="tar", uri=uri, cols=_tar_cols(columns)))
            else:
                files.append(uri)
        for uri in files:
            out.extend(_plan_source(uri, rows, endpoint_url, columns, workdir, runner))
        return out
    fs, path = storage.open_fs(src, endpoint_url)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"source not found: {src}")
    low = src.lower()
    if info.type == pafs.FileType.Directory:
        return _folder_units(src, rows, endpoint_url, columns, workdir, runner)
    if _is_list(src):
        return _lists_units([[src, info.size]], rows, endpoint_url, columns, workdir, runner)
    if low.endswith(TAR_SUFFIXES):
        return [Unit(kind="tar", uri=src, size=info.size, cols=_tar_cols(columns))]
    if low.endswith(IMAGE_SUFFIXES):
        return [Unit(kind="image", uri=src, end=1)]
    raise SourceError(f"unsupported source {src!r}: expected a folder, an s3:// prefix, a URL list ending in one "
                      f"of {LIST_SUFFIXES}, a tar shard (.tar) or a brace pattern of them")


def _tar_cols(columns) -> dict:
    want = _columns_cfg(columns)
    return {"category": want.get("category") or "", "metadata": list(want.get("metadata") or [])}


def _folder_units(src: str, rows: int, endpoint_url: str, columns, workdir: str, runner: Runner) -> list[Unit]:
    found = listing.list_source(src, workdir, rows, endpoint_url, runner)
    units = _lists_units(found.lists, rows, endpoint_url, columns, workdir, runner)
    tcols = _tar_cols(columns)
    units += [Unit(kind="tar", uri=uri, size=size, cols=tcols) for uri, size in found.tars]
    for uri, n in found.manifests:
        units += [Unit(kind="files", uri=uri, start=s, end=min(n, s + rows)) for s in range(0, n, rows)]
    return units


LIST_PLAN_BATCH = 64  # URL lists planned per task (footer / header reads)
# A planning task reads one list's footer (or a text list's first 64 KiB) at a time and keeps only unit descriptors:
# the interpreter and pyarrow, plus the largest footer pyarrow accepts by default (its Thrift limits, ~100 MB).
LIST_PLAN_PEAK_BYTES = 256 * 2**20


def _lists_units(lists: list[list], rows: int, endpoint_url: str, columns, workdir: str,
                 runner: Runner) -> list[Unit]:
    """Units of URL lists; their headers and footers are read by tasks (in batches), and the large row groups of
    Parquet lists are re-chunked by tasks, one per row group, before any unit reads them."""
    if not lists:
        return []
    cols = _columns_cfg(columns)
    batches = [lists[i:i + LIST_PLAN_BATCH] for i in range(0, len(lists), LIST_PLAN_BATCH)]
    planned = runner(plan_lists, [(b, rows, endpoint_url, cols, workdir) for b in batches], LIST_PLAN_PEAK_BYTES)
    units: list[Unit] = []
    jobs: list[tuple] = []
    for part_units, part_jobs in planned:
        units += [Unit(**u) for u in part_units]
        jobs += part_jobs
    if jobs:
        mem = max(rechunk_peak_bytes(rows, j[5]) for j in jobs)
        runner(rechunk_group, [(*j[:5], endpoint_url) for j in jobs], mem)
    return units


def plan_lists(lists: list[list], rows: int, endpoint_url: str, columns: dict,
               workdir: str) -> tuple[list[dict], list[tuple]]:
    """One planning task (memory LIST_PLAN_PEAK_BYTES): the units of a batch of URL lists (as dicts) and the
    re-chunking jobs they need (uri, row groups, rows per unit, columns, copy folder, bytes per row)."""
    units: list[dict] = []
    jobs: list[tuple] = []
    for uri, size in lists:
        fs, path = storage.open_fs(uri, endpoint_url)
        if uri.lower().endswith(".parquet"):
            u, j = _parquet_units(uri, fs, path, size, rows, columns, workdir)
            units += [asdict(x) for x in u]
            jobs += j
        else:
            units += [asdict(x) for x in _text_units(uri, fs, path, size, rows, columns)]
    return units, jobs


DIRECT_FOOTER_MAX = 1 << 20   # a list whose footer is larger than this is read through copies even in small groups
RECHUNK_JOB_UNITS = 64         # small row groups re-chunked per task (large ones: one task per row group)


def _parquet_units(uri: str, fs, path: str, size: int, rows: int, columns,
                   workdir: str) -> tuple[list[Unit], list[tuple]]:
    """Units of one Parquet list. Row groups of at most `rows` rows are read where they are, consecutive ones
    gathered into units of at most `rows` rows. A larger row group (a unit would read all of it) is re-chunked:
    a task copies its rows, columns in use only, into one small Parquet file per unit, which the unit reads whole
    (`Unit.part`). So is every group of a list whose footer is over DIRECT_FOOTER_MAX (each unit reads the footer)."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        meta, names = pf.metadata, pf.schema_arrow.names
    cols = resolve_columns(names, columns, uri)
    read = _read_cols(cols)
    big_footer = meta.serialized_size > DIRECT_FOOTER_MAX
    units: list[Unit] = []
    jobs: list[tuple] = []
    direct: list[int] = []           # [first row, rows] of the run of small groups gathered so far
    copy: list = []                  # [first row, rows, groups] of the run of groups to copy
    first = 0

    def close_direct():
        if direct and direct[1]:
            units.append(Unit(kind="parquet", uri=uri, start=direct[0], end=direct[0] + direct[1], size=size,
                              cols=cols))
        direct.clear()

    def close_copy():
        if not copy:
            return
        start, n, groups = copy
        digest = hashlib.sha256(json.dumps([uri, size, groups, rows, read]).encode()).hexdigest()[:32]
        folder = storage.join(workdir, "lists", digest)
        pieces = [storage.join(folder, f"{k:06d}.parquet") for k in range(-(-n // rows))]
        jobs.append((uri, groups, rows, read, folder, _row_bytes(meta, groups, read)))
        units.extend(Unit(kind="parquet", uri=uri, start=start + k * rows, end=min(start + n, start + (k + 1) * rows),
                          size=size, part=piece, cols=cols) for k, piece in enumerate(pieces))
        copy.clear()

    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if n > rows or big_footer:
            close_direct()
            if copy and (n > rows or copy[1] + n > RECHUNK_JOB_UNITS * rows):
                close_copy()
            if not copy:
                copy[:] = [first, 0, []]
            copy[1] += n
            copy[2].append(g)
            if n > rows:
                close_copy()
        else:
            close_copy()
            if direct and direct[1] + n > rows:
                close_direct()
            if not direct:
                direct[:] = [first, 0]
            direct[1] += n
        first += n
    close_direct()
    close_copy()
    return units, jobs


def _row_bytes(meta, groups: list[int], names: list[str]) -> int:
    """Uncompressed bytes per row of the columns `names` in some row groups (from the footer)."""
    total = rows = 0
    for g in groups:
        rg = meta.row_group(g)
        rows += rg.num_rows
        for c in range(rg.num_columns):
            col = rg.column(c)
            if col.path_in_schema.split(".", 1)[0] in names:
                total += col.total_uncompressed_size
    return max(1, total // max(1, rows))


RECHUNK_BASE_BYTES = 64 * 2**20  # measured: a 1M-row group streamed in 4,096-row batches peaked ~42 MiB


def rechunk_peak_bytes(rows_per_unit: int, row_bytes: int) -> int:
    """A re-chunking task's memory, stated: the base (interpreter, pyarrow's buffered column readers: measured
    flat at ~42 MiB for row groups of 250k to 2M rows) plus up to two units' rows held while one piece is cut,
    three times (decoded batches, the piece, its encoded pages). Independent of the row group's size."""
    return RECHUNK_BASE_BYTES + 3 * 2 * rows_per_unit * row_bytes


RECHUNK_DONE = "_done"


def rechunk_group(uri: str, groups: list[int], rows: int, names: list[str], folder: str,
                  endpoint_url: str = "") -> int:
    """Copy the columns `names` of some consecutive row groups into `folder` as one Parquet file of `rows` rows per
    unit (000000.parquet, ...; the last may be shorter), streaming (buffered column reads, one batch at a time),
    each file written atomically, then the marker `_done`. Already done: nothing to do. Returns the rows copied."""
    done = storage.join(folder, RECHUNK_DONE)
    if storage.exists(done, endpoint_url):
        return 0
    fs, path = storage.open_fs(uri, endpoint_url)
    n = k = 0
    held: list = []
    held_rows = 0
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
        schema = pa.schema([pf.schema_arrow.field(c) for c in names])
        for batch in pf.iter_batches(batch_size=rows, row_groups=groups, columns=names, use_threads=False):
            held.append(batch)
            held_rows += batch.num_rows
            while held_rows >= rows:
                table = pa.Table.from_batches(held, schema=schema)
                _write_piece(table.slice(0, rows), storage.join(folder, f"{k:06d}.parquet"), endpoint_url)
                k += 1
                n += rows
                rest = table.slice(rows)
                held, held_rows = rest.to_batches(), rest.num_rows
    if held_rows:
        _write_piece(pa.Table.from_batches(held, schema=schema), storage.join(folder, f"{k:06d}.parquet"),
                     endpoint_url)
        n += held_rows
    storage.write_bytes_atomic(done, str(n).encode(), endpoint_url)
    return n


def _write_piece(table: pa.Table, uri: str, endpoint_url: str) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes_atomic(uri, buf.getvalue().to_pybytes(), endpoint_url)


def _text_units(uri: str, fs, path: str, size: int, rows: int, columns) -> list[Unit]:
    low = uri.lower()
    kind = "csv" if low.endswith(".csv") else "tsv" if low.endswith(".tsv") else "text"
    with fs.open_input_file(path) as f:
        head = f.read(min(size, 1 << 16))
    body_start = 0
    cols: dict = {}
    if kind != "text":
        first = head.split(b"\n", 1)[0]
        names = _header(first, kind)
        cols = resolve_columns(names, columns, uri)
        body_start = len(first) + 1
    lines = max(1, head[body_start:].count(b"\n"))
    avg = max(1, (len(head) - body_start) // lines)
    step = max(1, avg * rows)
    return [Unit(kind=kind, uri=uri, start=s, end=min(size, s + step), size=size, cols=cols)
            for s in range(body_start, max(size, body_start), step)]


def _header(first: bytes, kind: str) -> list[str]:
    text = first.decode("utf-8", "replace").rstrip("\r")
    return [c.strip() for c in next(csv.reader([text], delimiter="\t" if kind == "tsv" else ","), [])]


# ------------------------------------------------------------------------------------------- reading

def _read_range(fs, path: str, start: int, end: int) -> list[bytes]:
    """Lines whose first byte lies in [start, end) (the Hadoop split rule: no line is read twice or missed)."""
    with fs.open_input_file(path) as f:
        if start > 0:
            f.seek(start - 1)
            prev = f.read(1)
        else:
            prev = b"\n"
        f.seek(start)
        buf = io.BytesIO()
        chunk = f.read(end - start)
        buf.write(chunk)
        # finish the line that straddles `end`
        while chunk and not buf.getvalue().endswith(b"\n"):
            chunk = f.read(4096)
            if not chunk:
                break
            nl = chunk.find(b"\n")
            buf.write(chunk if nl < 0 else chunk[:nl + 1])
            if nl >= 0:
                break
    data = buf.getvalue()
    if prev != b"\n":  # the first partial line belongs to the previous unit
        nl = data.find(b"\n")
        data = b"" if nl < 0 else data[nl + 1:]
    return data.splitlines()


def read_rows(uri: str, start: int, end: int, columns: list[str], endpoint_url: str = ""):
    """Rows [start, end) of a Parquet file, reading only the row groups that overlap them (pyarrow Table)."""
    fs, path = storage.open_fs(uri, endpoint_url)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        groups, first, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < end and offset + n > start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - (first or 0), end - start)


def read_items(unit: Unit, endpoint_url: str = "") -> Iterator[Item]:
    """The inputs of one unit, numbered within the unit (empty lines skipped). Tar units are read by tars.py."""
    if unit.kind == "image":
        yield Item(0, unit.uri)
        return
    if unit.kind == "files":
        for i, p in enumerate(read_rows(unit.uri, unit.start, unit.end, ["path"], endpoint_url)["path"].to_pylist()):
            yield Item(i, p)
        return
    if unit.kind == "tar":
        raise ValueError("tar units are read as a stream (pipelines/curation/tars.py), not item by item")
    cols = unit.cols
    if unit.kind == "parquet":
        if unit.part:  # the unit's own re-chunked file: one read of its bytes
            table = pq.read_table(pa.BufferReader(storage.read_bytes(unit.part, endpoint_url)),
                                  columns=_read_cols(cols))
        else:
            table = read_rows(unit.uri, unit.start, unit.end, _read_cols(cols), endpoint_url)
        get = {c: table[c].to_pylist() for c in _read_cols(cols)}
        for i in range(table.num_rows):
            yield _item(i, lambda c, i=i: get[c][i], cols)
        return
    fs, path = storage.open_fs(unit.uri, endpoint_url)
    lines = _read_range(fs, path, unit.start, unit.end)
    if unit.kind == "text":
        idx = 0
        for raw in lines:
            text = raw.decode("utf-8", "replace").strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split("\t") if "\t" in text else text.split(None, 1)
            yield Item(idx, parts[0].strip(), _cat(parts[1] if len(parts) > 1 else None))
            idx += 1
        return
    with fs.open_input_file(path) as f:
        header = _header(f.read(1 << 16).split(b"\n", 1)[0], unit.kind)
    pos = {n: i for i, n in enumerate(header)}
    idx = 0
    delim = "\t" if unit.kind == "tsv" else ","
    for row in csv.reader((raw.decode("utf-8", "replace") for raw in lines), delimiter=delim):
        if not row or not any(c.strip() for c in row):
            continue
        yield _item(idx, lambda c, row=row: row[pos[c]] if pos.get(c, len(row)) < len(row) else None, cols)
        idx += 1


def _item(index: int, get, cols: dict) -> Item:
    """An Item from one row (get(column) -> value) and the resolved columns of its list."""
    url = str(get(cols["url"]) or "").strip()
    cat = _cat(get(cols["category"])) if cols.get("category") else None
    w = _int(get(cols["width"])) if cols.get("width") else None
    h = _int(get(cols["height"])) if cols.get("height") else None
    meta = metadata_json({name: get(src) for name, src in cols.get("metadata") or []})
    return Item(index, url, cat, w, h, meta)


def metadata_json(values: dict) -> str | None:
    """The carried metadata of one row as a JSON object (None when nothing is carried); long strings are cut at
    METADATA_VALUE_CHARS, values JSON cannot hold are written as text."""
    if not values:
        return None
    out = {k: (v[:METADATA_VALUE_CHARS] if isinstance(v, str) else v) for k, v in values.items()}
    return json.dumps(out, ensure_ascii=False, default=str, sort_keys=True)


def _int(value) -> int | None:
    try:
        v = int(float(value))
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def _cat(value) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def prefilter(item: Item, filters) -> tuple[str, str] | None:
    """(reason, detail) when the size a list declares for this row already fails the resolution or aspect filter
    (the row is then never fetched), else None. Rows without a declared size are fetched and decided on the image."""
    w, h = item.width, item.height
    if not w or not h:
        return None
    if min(w, h) < filters.min_short_side:
        return "prefilter_too_small", f"listed {w}x{h}, short side < {filters.min_short_side}"
    if max(w, h) / min(w, h) > filters.max_aspect_ratio:
        return "prefilter_bad_aspect", f"listed {w}x{h}, aspect > {filters.max_aspect_ratio}"
    return None
