"""Local paths and s3:// URIs through one interface (pyarrow filesystems over fsspec/s3fs).

`open_fs(uri, endpoint_url)` returns (pyarrow FileSystem, path inside it). An S3 endpoint override (MinIO, moto)
comes from the config or from the AWS_ENDPOINT_URL environment variable.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def s3_storage_options(endpoint_url: str = "") -> dict:
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "") or os.environ.get("AWS_ENDPOINT_URL_S3", "")
    opts: dict = {}
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def fsspec_fs(uri: str, endpoint_url: str = ""):
    """An fsspec filesystem for the URI (s3fs for s3://, local otherwise)."""
    import fsspec

    if uri.startswith("s3://"):
        # No listing cache: objects written by other processes (Ray workers) must be visible at once.
        return fsspec.filesystem("s3", use_listings_cache=False, **s3_storage_options(endpoint_url))
    return fsspec.filesystem("file")


def open_fs(uri: str, endpoint_url: str = "") -> tuple[pafs.FileSystem, str]:
    if uri.startswith("s3://"):
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs(uri, endpoint_url)))
        return fs, uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


def exists(uri: str, endpoint_url: str = "") -> bool:
    fs, path = open_fs(uri, endpoint_url)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str, endpoint_url: str = "") -> None:
    fs, path = open_fs(uri, endpoint_url)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str, endpoint_url: str = "") -> bytes:
    fs, path = open_fs(uri, endpoint_url)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes, endpoint_url: str = "") -> None:
    """Write under a temporary name, then rename, so readers never see a partial file.

    On S3 a single PUT is already atomic; the temp+move keeps one code path (the move is a copy+delete there).
    """
    fs, path = open_fs(uri, endpoint_url)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


@contextlib.contextmanager
def atomic_output(uri: str, endpoint_url: str = ""):
    """An output stream for writing a large file without holding it in memory: written under a temporary name and
    renamed to `uri` when the block ends without an exception (removed otherwise), so readers never see a
    partial file (as write_bytes_atomic)."""
    fs, path = open_fs(uri, endpoint_url)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(tmp) as f:
            yield f
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise


def delete(uri: str, endpoint_url: str = "") -> None:
    """Remove one file; a file that is already gone is not an error."""
    fs, path = open_fs(uri, endpoint_url)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def list_files(uri: str, suffix: str = "", endpoint_url: str = "") -> list[str]:
    """Files below `uri` (recursive), as URIs of the same scheme, sorted."""
    fs, path = open_fs(uri, endpoint_url)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)]
    out = [p for p in out if ".tmp-" not in p]
    prefix = "s3://" if uri.startswith("s3://") else ""
    return sorted(prefix + p for p in out)
