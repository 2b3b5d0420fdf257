"""Reading the sharded (torch.distributed.checkpoint, "DCP") checkpoints an FSDP run writes, without a process group.

A sharded checkpoint folder holds config.json (layout "dcp"), the run's position/RNG state (train_state.*), and
`dcp/`: DCP's `.metadata` plus one `__<rank>_<i>.distcp` data file per writing rank. Its keys are
`model.<param>`, `ema.<param>` and `optim.state.<param>.<exp_avg|exp_avg_sq|step>` / `optim.param_groups...`.

Here: the weights of one prefix ("model" or "ema") as full tensors, read a group of tensors at a time (DCP reads
only the byte ranges each needs), and a safetensors writer that streams tensors to a file one at a time, so an
export never holds more than one group of tensors in memory. Local paths and s3:// URIs both work.
"""

from __future__ import annotations

import contextlib
import json
import struct
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from . import storage

DCP_DIR = "dcp"
LAYOUT = "dcp"
SKIP = ("rope", "freqs")  # recomputed from the grid, never stored (vosr/checkpoint.py)

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


@contextlib.contextmanager
def quiet_no_dist():
    """DCP warns on every load without a process group; reading one here is the intent, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def nbytes(dtype: torch.dtype, shape) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def reader(folder: str, endpoint_url: str = ""):
    """A DCP storage reader for `<folder>/dcp` (a local FileSystemReader, or fsspec for s3://)."""
    path = storage.join(folder, DCP_DIR)
    if storage.is_remote(path):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader  # not re-exported in 2.14

        return FsspecReader(path, use_listings_cache=False, **storage.s3_storage_options(endpoint_url))
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path.removeprefix("file://"))


def tensor_specs(rdr, prefix: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{name: (dtype, full shape)} of the tensors stored under `prefix.` (e.g. "ema"), in stored order."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = rdr.read_metadata()
    head = prefix + "."
    out = {}
    for key, item in md.state_dict_metadata.items():
        name = key[len(head):]
        if key.startswith(head) and isinstance(item, TensorStorageMetadata) and not any(s in name for s in SKIP):
            out[name] = (item.properties.dtype, tuple(item.size))
    if not out:
        raise KeyError(f"the sharded checkpoint holds no '{prefix}' tensors")
    return out


def iter_tensors(folder: str, prefix: str, endpoint_url: str = "",
                 group_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full CPU tensor) for every `prefix` tensor, loading about `group_bytes` at a time (no process
    group: DCP's no_dist load assembles each tensor from every rank's shards)."""
    import torch.distributed.checkpoint as dcp

    rdr = reader(folder, endpoint_url)
    specs = tensor_specs(rdr, prefix)
    group: dict[str, torch.Tensor] = {}
    size = 0
    names = list(specs)
    for i, name in enumerate(names):
        dtype, shape = specs[name]
        group[f"{prefix}.{name}"] = torch.empty(shape, dtype=dtype)
        size += group[f"{prefix}.{name}"].nbytes
        if size >= group_bytes or i == len(names) - 1:
            with quiet_no_dist():
                dcp.load(group, storage_reader=reader(folder, endpoint_url), no_dist=True)
            for key, t in group.items():
                yield key[len(prefix) + 1:], t
            group, size = {}, 0


def read_tensors(folder: str, prefix: str, endpoint_url: str = "") -> dict[str, torch.Tensor]:
    """All `prefix` ("model" or "ema") weights of a sharded checkpoint, full, on CPU."""
    return dict(iter_tensors(folder, prefix, endpoint_url))


def write_safetensors(uri: str, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      tensors: Iterator[tuple[str, torch.Tensor]], endpoint_url: str = "") -> int:
    """Stream tensors into one safetensors file (the layout safetensors.torch.save writes) at `uri`, written under
    a temporary name and renamed when complete. `specs` fixes the header (names, dtypes, shapes) up front;
    `tensors` must yield exactly those names, in the same order. Returns the file's size in bytes."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        if dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {dtype} has no safetensors code")
        n = nbytes(dtype, shape)
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    fs, path = storage.open_fs(uri, endpoint_url)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    order = iter(header)
    with fs.open_output_stream(tmp) as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, t in tensors:
            want = next(order, None)
            if name != want:
                raise ValueError(f"export: got tensor {name!r} where {want!r} was due")
            spec = header[name]
            t = t.detach().to("cpu").contiguous()
            if list(t.shape) != spec["shape"] or _ST_DTYPES[t.dtype] != spec["dtype"]:
                raise ValueError(f"export: {name} is {tuple(t.shape)} {t.dtype}, the header says {spec}")
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        missing = next(order, None)
        if missing is not None:
            raise ValueError(f"export: tensor {missing!r} never came")
    fs.move(tmp, path)
    return 8 + len(head) + offset
