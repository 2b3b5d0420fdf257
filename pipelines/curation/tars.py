"""WebDataset tar shards (as written by webdataset's TarWriter or by img2dataset) as a curation source: one shard
is one unit. The shard is streamed (tarfile's "r|" mode over a buffered reader: no extraction to disk, no seeking),
members are grouped into samples by key (WebDataset's rule: the member name up to the first dot of its base name,
so `00001/000010023.jpg` and `00001/000010023.json` form sample `00001/000010023`), and each sample becomes one
input: its image member (the first whose extension is an image suffix) with its JSON member's fields and its other
small members (`txt`, `cls`) as metadata. The sample's source is `<shard URI>#<key>`.

Memory per shard (tar_unit_peak_bytes): the read buffers, one sample's members (the image capped at
crawl.max_bytes, small members at SMALL_MEMBER_MAX_BYTES), and stage 1's ledger row group and decode; never the
shard.

Counted reasons (one ledger row each, the job goes on): `tar_missing` (a shard named by a brace pattern that is
not there), `tar_truncated` (the shard ends inside a member or a header, or before its end-of-archive blocks),
`tar_corrupt` (a header that is not a tar header), `read_error` (storage failed mid-read), `no_image_member` (a
sample with no image member, e.g. only .json/.txt or a video), `oversize` (an image member over crawl.max_bytes);
an image member whose bytes are not an image gets the decoder's reason (not_image, truncated, ...). Samples read
before a truncation or corruption are kept; what follows it cannot be found again and is counted as the one row.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator

from pipelines.curation.crawl import FetchResult
from pipelines.curation.sources import Item, Unit, _cat, metadata_json
from vosr import storage
from vosr.imageio import IMAGE_SUFFIXES

SMALL_MEMBER_MAX_BYTES = 1 << 20      # a json/txt/cls member larger than this is skipped unread
SMALL_FIELDS = ("json", "txt", "cls")
TAR_READ_BLOCK = 8 << 20              # S3: bytes fetched per ranged read (fsspec readahead cache)
_IMAGE_EXTS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)


def tar_unit_peak_bytes(ccfg) -> int:
    """The stated bound on one tar shard's stage-1 working memory, whatever the shard's size: the S3 read-ahead
    block and tarfile's record buffer, the image member being read twice (tarfile joins its reads into one bytes
    object), the small members, the ledger rows buffered for one row group three times (stage1.stage1_peak_bytes
    states the same term), and one decode at the pixel cap (RGB pixels plus the copy hashed)."""
    return (2 * TAR_READ_BLOCK + 2 * ccfg.crawl.max_bytes + len(SMALL_FIELDS) * SMALL_MEMBER_MAX_BYTES
            + 3 * ccfg.stage1_buffer_mb * 2**20 + 2 * 3 * ccfg.filters.max_pixels)


def split_key(name: str) -> tuple[str, str]:
    """(sample key, field) of a member name: `dir/abc.seg.png` -> (`dir/abc`, `seg.png`)."""
    folder, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def _is_image_field(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1] in _IMAGE_EXTS


class _Tail:
    """A reader that remembers its last two reads, so the block at which tarfile stopped can be looked at (tarfile
    ends its iteration quietly at a header it cannot parse, which would hide a corrupt shard)."""

    def __init__(self, raw):
        self.raw = raw
        self.pos = 0
        self.chunks: list[tuple[int, bytes]] = []

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.chunks = [*self.chunks[-1:], (self.pos, data)]
        self.pos += len(data)
        return data

    def block_at(self, offset: int) -> bytes:
        if not self.chunks or offset < self.chunks[0][0]:
            return b""
        start = self.chunks[0][0]
        return b"".join(c for _, c in self.chunks)[offset - start: offset - start + tarfile.BLOCKSIZE]


def _open(uri: str, endpoint_url: str):
    if uri.startswith("s3://"):
        fs = storage.fsspec_fs(uri, endpoint_url)
        return fs.open(uri, "rb", block_size=TAR_READ_BLOCK, cache_type="readahead")
    return open(storage.open_fs(uri)[1], "rb", buffering=1 << 20)  # noqa: SIM115 - closed by the caller


def _failure(err: BaseException) -> str:
    msg = str(err).lower()
    if isinstance(err, tarfile.ReadError | EOFError) and any(
            s in msg for s in ("unexpected end", "truncated", "empty header", "empty file", "end of file")):
        return "tar_truncated"
    if isinstance(err, tarfile.TarError | EOFError):
        return "tar_corrupt"
    return "read_error"


class _Sample:
    def __init__(self, key: str):
        self.key = key
        self.image: bytes | None = None
        self.image_field = ""
        self.oversize = 0
        self.small: dict[str, bytes] = {}
        self.fields: list[str] = []


def _sample_input(unit: Unit, index: int, s: _Sample, max_bytes: int) -> tuple[Item, FetchResult]:
    source = f"{unit.uri}#{s.key}"
    meta: dict = {}
    if "json" in s.small:
        try:
            parsed = json.loads(s.small["json"].decode("utf-8", "replace"))
            meta = parsed if isinstance(parsed, dict) else {"json": parsed}
        except ValueError:
            meta = {}
    fields = {k: v.decode("utf-8", "replace").strip() for k, v in s.small.items() if k != "json"}
    low = {k.lower(): v for k, v in meta.items()}
    low.update({k: v for k, v in fields.items() if k not in low})
    cols = unit.cols or {}
    cat_key = (cols.get("category") or "").lower()
    category = _cat(low.get(cat_key)) if cat_key else _cat(low.get("category", fields.get("cls")))
    carried = {name: low.get(name.strip().lower()) for name in cols.get("metadata") or []}
    item = Item(index, source, category, metadata=metadata_json(carried))
    if s.oversize:
        return item, FetchResult(source, "oversize", None, f"{s.image_field} member {s.oversize} bytes > {max_bytes}")
    if s.image is None:
        return item, FetchResult(source, "no_image_member", None, f"members: {', '.join(s.fields) or 'none'}")
    return item, FetchResult(source, "ok", s.image, attempts=1)


def iter_tar(unit: Unit, max_bytes: int, endpoint_url: str = "") -> Iterator[tuple[Item, FetchResult]]:
    """(item, result) per sample of one shard, in shard order, streamed; a failure of the shard itself is one more
    row with its reason (see the module docstring)."""
    try:
        raw = _open(unit.uri, endpoint_url)
    except FileNotFoundError as exc:
        yield Item(0, unit.uri), FetchResult(unit.uri, "tar_missing", None, str(exc)[:200])
        return
    except OSError as exc:
        yield Item(0, unit.uri), FetchResult(unit.uri, "read_error", None, f"{type(exc).__name__}: {str(exc)[:200]}")
        return
    index = 0
    cur: _Sample | None = None
    tail = _Tail(raw)
    failure: tuple[str, str] | None = None
    try:
        try:
            tf = tarfile.open(fileobj=tail, mode="r|")
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if cur is None or key != cur.key:
                    if cur is not None:
                        yield _sample_input(unit, index, cur, max_bytes)
                        index += 1
                    cur = _Sample(key)
                cur.fields.append(ext or "(none)")
                if _is_image_field(ext) and cur.image is None and not cur.oversize:
                    if member.size > max_bytes:
                        cur.oversize, cur.image_field = member.size, ext
                    else:
                        cur.image, cur.image_field = tf.extractfile(member).read(), ext
                elif ext in SMALL_FIELDS and member.size <= SMALL_MEMBER_MAX_BYTES:
                    cur.small[ext] = tf.extractfile(member).read()
            block = tail.block_at(tf.offset)
            if len(block) < tarfile.BLOCKSIZE:
                failure = ("tar_truncated", f"ends at byte {tail.pos} without the end-of-archive blocks")
            elif block.strip(b"\0"):
                failure = ("tar_corrupt", f"invalid tar header at byte {tf.offset}")
        except (tarfile.TarError, EOFError, OSError) as exc:
            failure = (_failure(exc), f"{type(exc).__name__}: {str(exc)[:200]} (near byte {tail.pos})")
        if cur is not None and (failure is None or cur.image is not None or cur.oversize):
            yield _sample_input(unit, index, cur, max_bytes)
            index += 1
        if failure is not None:
            yield Item(index, unit.uri), FetchResult(unit.uri, failure[0], None, failure[1])
    finally:
        raw.close()
