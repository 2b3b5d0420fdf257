"""Versioned schema of feature shards and the dataset-level metadata file (the precompute -> training contract).

Layout under the feature output root (a folder or an s3:// prefix):

    _vosr_features.json              dataset metadata: encoder/VAE identities + weight hashes, latent scaling,
                                     resolution, dtype, K, shapes, degradation config, schema version
    summary.json                     last run's summary (throughput, bytes per sample per column, counts)
    shards/part-<key>.parquet        one feature shard per curated input shard part-<key>.parquet
    shards/part-<key>.stats.json     per-shard counts (images, rows, failed by reason)

One row per (image id, variant). Tensor columns are `fixed_size_list<dtype>[prod(shape)]` with the tensor shape in
the field metadata (`vosr.shape`, JSON) and the logical dtype in `vosr.dtype`. float16 and float32 are stored as
such; bfloat16 has no Arrow type, so it is stored as its raw 16 bits in uint16 (`vosr.dtype = bfloat16`) and
decoded bit-exactly. Fixed-size lists keep Parquet and Ray Data happy without extension types.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from vosr import storage

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"vosr.features.schema_version"
META_FILE = "_vosr_features.json"
SUMMARY_FILE = "summary.json"
SHARDS_DIR = "shards"
TENSOR_COLUMNS = ("hr_latent", "lr_latent", "sem_tokens")

_ARROW_STORAGE = {"float16": pa.float16(), "bfloat16": pa.uint16(), "float32": pa.float32()}


class FeatureMismatchError(ValueError):
    """A feature set made with other encoders, scaling, resolution or schema than the config asks for."""


def tensor_field(name: str, shape: tuple[int, ...], dtype: str) -> pa.Field:
    if dtype not in _ARROW_STORAGE:
        raise ValueError(f"unknown feature dtype {dtype!r}; known: {sorted(_ARROW_STORAGE)}")
    n = int(math.prod(shape))
    elem = pa.field("element", _ARROW_STORAGE[dtype], nullable=False)
    return pa.field(name, pa.list_(elem, n), nullable=False,
                    metadata={b"vosr.shape": json.dumps(list(shape)).encode(), b"vosr.dtype": dtype.encode()})


def feature_schema(latent_shape: tuple[int, ...], sem_shape: tuple[int, ...], dtype: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),             # curated image id
            pa.field("variant", pa.int32(), nullable=False),         # 0..K-1
            pa.field("seed", pa.int64(), nullable=False),            # sample_seed(global, id, variant): crop + LR
            pa.field("crop_box", pa.list_(pa.int32(), 4), nullable=False),  # left, top, width, height
            pa.field("image_size", pa.list_(pa.int32(), 2), nullable=False),  # width, height the box refers to
            tensor_field("hr_latent", latent_shape, dtype),
            tensor_field("lr_latent", latent_shape, dtype),
            tensor_field("sem_tokens", sem_shape, dtype),
            pa.field("degrade_params", pa.string(), nullable=False),  # JSON of the drawn degradation parameters
        ],
        metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
    )


def schema_for_config(cfg) -> pa.Schema:
    return feature_schema(latent_shape(cfg), sem_shape(cfg), cfg.precompute.dtype)


def latent_shape(cfg) -> tuple[int, int, int]:
    from vosr.encoders import autoencoder_spec

    spec = autoencoder_spec(cfg.autoencoder)
    res = int(cfg.data.resolution)
    if res % spec.downsample:
        raise ValueError(f"data.resolution {res} is not a multiple of the autoencoder factor {spec.downsample}")
    return (spec.latent_channels, res // spec.downsample, res // spec.downsample)


def sem_shape(cfg) -> tuple[int, int]:
    from vosr.encoders import semantic_spec

    spec = semantic_spec(cfg.semantic)
    return (spec.num_tokens, spec.dim)


# --- tensors <-> arrow ------------------------------------------------------------------------------------------

def tensor_to_arrow(x: torch.Tensor, dtype: str) -> pa.FixedSizeListArray:
    """[B, *shape] float tensor -> fixed_size_list array in the storage dtype."""
    b = x.shape[0]
    flat = x.detach().reshape(b, -1).cpu()
    if dtype == "bfloat16":
        values = flat.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    elif dtype == "float16":
        values = flat.to(torch.float16).numpy()
    elif dtype == "float32":
        values = flat.to(torch.float32).numpy()
    else:
        raise ValueError(f"unknown feature dtype {dtype!r}; known: {sorted(_ARROW_STORAGE)}")
    elem = pa.field("element", _ARROW_STORAGE[dtype], nullable=False)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), type=pa.list_(elem, flat.shape[1]))


def _column_to_numpy(col: Any, n_values: int | None = None) -> np.ndarray:
    """A fixed_size_list column (arrow) or Ray's numpy rendering of it -> [B, n] numpy array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col, pa.FixedSizeListArray):
        width = col.type.list_size
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width)
    arr = np.asarray(col)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v) for v in arr]) if len(arr) else arr.reshape(0, n_values or 0)
    return arr.reshape(arr.shape[0], -1)


def _decode_tensor(values: np.ndarray, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    b = values.shape[0]
    if dtype == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(values.astype(np.uint16)).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.array(values))
    return t.float().reshape(b, *shape)


def decode_feature_rows(batch: Any, meta: dict | None = None) -> dict[str, Any]:
    """A batch of feature rows -> {"hr_latent" [B,C,h,w], "lr_latent" [B,C,h,w], "sem_tokens" [B,N,D] float32
    torch tensors, "id" list[str], "variant" LongTensor, "seed" LongTensor}.

    `batch` is a pyarrow Table / RecordBatch (shapes and dtype read from the field metadata) or a dict of numpy
    arrays as Ray Data hands out with batch_format="numpy" (then `meta`, the dataset metadata, gives them).
    """
    out: dict[str, Any] = {}
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        schema = batch.schema
        for name in TENSOR_COLUMNS:
            fmeta = schema.field(name).metadata or {}
            if b"vosr.shape" in fmeta:  # self-describing (Parquet keeps field metadata)
                shape, dtype = tuple(json.loads(fmeta[b"vosr.shape"])), fmeta[b"vosr.dtype"].decode()
            elif meta is not None:  # some Ray operations drop field metadata: fall back to the dataset metadata
                shape, dtype = tuple(meta["sem_shape" if name == "sem_tokens" else "latent_shape"]), meta["dtype"]
            else:
                raise ValueError(f"column {name} lacks its vosr.shape metadata; pass the dataset metadata")
            out[name] = _decode_tensor(_column_to_numpy(batch.column(name)), shape, dtype)
        cols = {n: batch.column(n).to_pylist() for n in ("id", "variant", "seed")}
    else:
        if meta is None:
            raise ValueError("decode_feature_rows needs the dataset metadata (_vosr_features.json) for numpy batches")
        shapes = {"hr_latent": meta["latent_shape"], "lr_latent": meta["latent_shape"],
                  "sem_tokens": meta["sem_shape"]}
        for name in TENSOR_COLUMNS:
            shape = tuple(shapes[name])
            out[name] = _decode_tensor(_column_to_numpy(batch[name], math.prod(shape)), shape, meta["dtype"])
        cols = {n: list(np.asarray(batch[n]).tolist()) for n in ("id", "variant", "seed")}
    out["id"] = [str(v) for v in cols["id"]]
    out["variant"] = torch.tensor(cols["variant"], dtype=torch.long)
    out["seed"] = torch.tensor(cols["seed"], dtype=torch.long)
    return out


# --- dataset metadata ---------------------------------------------------------------------------------------------

def build_metadata(cfg, ae_identity: dict, sem_identity: dict) -> dict:
    """The `_vosr_features.json` content for a run with `cfg` and the built encoders' identities."""
    return {
        "kind": "vosr-features",
        "schema_version": SCHEMA_VERSION,
        "autoencoder": dict(ae_identity),
        "semantic": dict(sem_identity),
        "sample_posterior": bool(cfg.autoencoder.sample_posterior),
        "latent_scaling": ae_identity.get("scaling"),
        "latent_shape": list(latent_shape(cfg)),
        "sem_shape": list(sem_shape(cfg)),
        "resolution": int(cfg.data.resolution),
        "dtype": cfg.precompute.dtype,
        "variants": int(cfg.precompute.variants),
        "seed": int(cfg.run.seed),
        "degrade": _plain(cfg.degrade),
        "preset": cfg.preset,
    }


def _plain(section) -> Any:
    from vosr.config.schema import to_dict

    return to_dict(section)


def write_metadata(root: str, meta: dict, endpoint_url: str = "") -> None:
    storage.write_bytes_atomic(storage.join(root, META_FILE), json.dumps(meta, indent=2, sort_keys=True).encode(),
                               endpoint_url)


def read_metadata(root: str, endpoint_url: str = "") -> dict:
    uri = storage.join(root, META_FILE)
    if not storage.exists(uri, endpoint_url):
        raise FileNotFoundError(f"{uri} not found: {root} is not a VOSR feature set (run pipelines/precompute.py)")
    return json.loads(storage.read_bytes(uri, endpoint_url))


def check_compatible(meta: dict, cfg, ae_identity: dict | None = None, sem_identity: dict | None = None) -> None:
    """Refuse a feature set made with other encoders, scaling, resolution, shapes or schema than `cfg` asks for.

    Config-level checks always run (names, layer, input size, resolution, shapes). Pass the identities of the
    encoders the consumer built to also compare weight hashes and latent scaling. Raises FeatureMismatchError
    naming every difference.
    """
    diffs: list[str] = []

    def cmp(what: str, have: Any, want: Any) -> None:
        if have != want:
            diffs.append(f"{what}: feature set has {have!r}, config asks for {want!r}")

    cmp("schema_version", meta.get("schema_version"), SCHEMA_VERSION)
    ae, sem = meta.get("autoencoder", {}), meta.get("semantic", {})
    cmp("autoencoder.name", ae.get("name"), cfg.autoencoder.name)
    cmp("semantic.name", sem.get("name"), cfg.semantic.name)
    cmp("semantic.layer", sem.get("layer"), cfg.semantic.layer)
    cmp("semantic.input_size", sem.get("input_size"), cfg.semantic.input_size)
    cmp("data.resolution", meta.get("resolution"), int(cfg.data.resolution))
    try:
        cmp("latent_shape", meta.get("latent_shape"), list(latent_shape(cfg)))
        cmp("sem_shape", meta.get("sem_shape"), list(sem_shape(cfg)))
    except (KeyError, ValueError) as exc:
        diffs.append(f"config shapes: {exc}")
    if ae_identity is not None:
        cmp("autoencoder.weights_sha256", ae.get("weights_sha256"), ae_identity.get("weights_sha256"))
        cmp("latent scaling", meta.get("latent_scaling"), ae_identity.get("scaling"))
    if sem_identity is not None:
        cmp("semantic.weights_sha256", sem.get("weights_sha256"), sem_identity.get("weights_sha256"))
    if diffs:
        raise FeatureMismatchError("feature set is incompatible with this config:\n  " + "\n  ".join(diffs))


# --- sizes ---------------------------------------------------------------------------------------------------------

BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def bytes_per_variant(latent: tuple[int, ...], sem: tuple[int, ...], dtype: str) -> dict[str, int]:
    """Raw (uncompressed) bytes of the tensor columns of one row."""
    b = BYTES[dtype]
    return {"hr_latent": math.prod(latent) * b, "lr_latent": math.prod(latent) * b, "sem_tokens": math.prod(sem) * b}
