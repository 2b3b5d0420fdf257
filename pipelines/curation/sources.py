"""Sources -> work units. A unit is a small, deterministic slice of the input (a byte range of a URL list, a
row range of a Parquet list, or a run of files from a folder / s3:// prefix). The driver only reads file sizes
and Parquet footers to build units, never the URLs themselves, so it holds at 100M-URL lists; workers read
their own slice. A unit's key hashes its descriptor, which names its stage-1 shard (resumability).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vosr import storage
from vosr.imageio import IMAGE_SUFFIXES

LIST_SUFFIXES = (".txt", ".csv", ".parquet")


@dataclass
class Unit:
    kind: str                      # "text" | "csv" | "parquet" | "files"
    uri: str = ""                  # list file (text/csv/parquet)
    start: int = 0                 # byte offset (text/csv) or first row (parquet)
    end: int = 0                   # end byte offset (exclusive) or end row
    size: int = 0                  # list file size, so an edited list gets new units
    paths: list[str] = field(default_factory=list)  # kind == files: image URIs

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
    """One input of a unit: a URL or a file URI, with its category when the list gives one."""

    index: int
    source: str
    category: str | None = None


class SourceError(ValueError):
    """A source that cannot be read (missing file, list without a url column)."""


def _is_list(uri: str) -> bool:
    return uri.lower().endswith(LIST_SUFFIXES)


def plan_units(sources: list[str], rows_per_unit: int, endpoint_url: str = "") -> list[Unit]:
    """All work units of the configured sources, in a stable order. A folder or s3:// prefix is planned as every
    URL list inside it (.txt/.csv/.parquet, recursively, sorted by path) plus runs of the image files inside it.
    A source that plans no unit (an empty list, a folder with neither lists nor images) is an error naming it."""
    units: list[Unit] = []
    for src in sources:
        fs, path = storage.open_fs(src, endpoint_url)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"source not found: {src}")
        if info.type == pafs.FileType.File and _is_list(src):
            found = _list_units(src, fs, path, info.size, rows_per_unit)
        elif info.type == pafs.FileType.Directory:
            found = _folder_units(src, fs, rows_per_unit, endpoint_url)
        elif info.type == pafs.FileType.File and src.lower().endswith(IMAGE_SUFFIXES):
            found = [Unit(kind="files", paths=[src])]
        else:
            raise SourceError(f"unsupported source {src!r}: expected a folder, an s3:// prefix or a URL list "
                              f"ending in one of {LIST_SUFFIXES}")
        if not found:
            raise SourceError(f"source {src!r} plans no input blocks: expected a non-empty URL list "
                              f"({', '.join(LIST_SUFFIXES)}) or image files ({', '.join(IMAGE_SUFFIXES)}) in it")
        units.extend(found)
    return units


def _folder_units(src: str, fs, rows_per_unit: int, endpoint_url: str) -> list[Unit]:
    """URL lists first (each split into units), then the image files in runs of rows_per_unit, by sorted path."""
    files = storage.list_files(src, endpoint_url=endpoint_url)  # recursive, sorted, temporaries left out
    units: list[Unit] = []
    for f in files:
        if _is_list(f):
            path = storage.open_fs(f, endpoint_url)[1]
            units.extend(_list_units(f, fs, path, fs.get_file_info(path).size, rows_per_unit))
    images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    for i in range(0, len(images), rows_per_unit):
        units.append(Unit(kind="files", paths=images[i:i + rows_per_unit]))
    return units


def _list_units(uri: str, fs, path: str, size: int, rows: int) -> list[Unit]:
    low = uri.lower()
    if low.endswith(".parquet"):
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            names = meta.schema.names
            if "url" not in names:
                raise SourceError(f"{uri}: Parquet URL list needs a 'url' column (has {names})")
            n = meta.num_rows
        return [Unit(kind="parquet", uri=uri, start=s, end=min(n, s + rows), size=size) for s in range(0, n, rows)]
    kind = "csv" if low.endswith(".csv") else "text"
    with fs.open_input_file(path) as f:
        head = f.read(min(size, 1 << 16))
    body_start = 0
    if kind == "csv":
        first = head.split(b"\n", 1)[0]
        cols = next(csv.reader([first.decode("utf-8", "replace")]), [])
        if "url" not in [c.strip().lower() for c in cols]:
            raise SourceError(f"{uri}: CSV URL list needs a header with a 'url' column (has {cols})")
        body_start = len(first) + 1
    lines = max(1, head[body_start:].count(b"\n"))
    avg = max(1, (len(head) - body_start) // lines)
    step = max(1, avg * rows)
    return [Unit(kind=kind, uri=uri, start=s, end=min(size, s + step), size=size)
            for s in range(body_start, max(size, body_start), step)]


def _csv_header(fs, path: str) -> list[str]:
    with fs.open_input_file(path) as f:
        first = f.read(1 << 16).split(b"\n", 1)[0].decode("utf-8", "replace")
    return [c.strip().lower() for c in next(csv.reader([first]), [])]


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


def read_items(unit: Unit, endpoint_url: str = "") -> Iterator[Item]:
    """The inputs of one unit, numbered within the unit (empty lines skipped)."""
    if unit.kind == "files":
        for i, p in enumerate(unit.paths):
            yield Item(i, p)
        return
    fs, path = storage.open_fs(unit.uri, endpoint_url)
    if unit.kind == "parquet":
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            cols = ["url"] + (["category"] if "category" in pf.schema_arrow.names else [])
            groups, first, offset = [], None, 0
            for g in range(pf.metadata.num_row_groups):  # read only the row groups overlapping the unit
                n = pf.metadata.row_group(g).num_rows
                if offset < unit.end and offset + n > unit.start:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            table = pf.read_row_groups(groups, columns=cols)
        part = table.slice(unit.start - (first or 0), unit.end - unit.start).to_pylist()
        for i, r in enumerate(part):
            yield Item(i, str(r["url"] or "").strip(), _cat(r.get("category")))
        return
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
    header = _csv_header(fs, path)
    ui = header.index("url")
    ci = header.index("category") if "category" in header else -1
    idx = 0
    for row in csv.reader(raw.decode("utf-8", "replace") for raw in lines):
        if not row or not any(c.strip() for c in row):
            continue
        url = row[ui].strip() if ui < len(row) else ""
        cat = row[ci] if 0 <= ci < len(row) else None
        yield Item(idx, url, _cat(cat))
        idx += 1


def _cat(value) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def source_label(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))
