"""Training data: feature shards (or the online dataset) -> held-out split -> per-worker batch streams.

Driver side: `training_datasets(cfg)` opens the materialised feature shards (after checking their metadata file
against the config, pipelines/feature_schema.check_compatible) or builds the online dataset
(pipelines/online.py), and splits rows by a hash of their image id into train and held-out validation
(data.holdout_fraction; every variant of an image lands on the same side).
Worker side: `BatchStream` iterates the worker's streaming-split shard (`ray.train.get_dataset_shard`) epoch after
epoch with a per-(rank, epoch) local shuffle seed and counts its position (epoch, batch in epoch) for checkpoints;
a resumed stream skips the batches its epoch had already consumed.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

_HASH_SPACE = 2**64


def is_holdout(sample_id: str, fraction: float) -> bool:
    """Whether an image id belongs to the held-out split (stable hash, independent of variant and order)."""
    h = hashlib.blake2b(b"vosr-holdout\x1f" + str(sample_id).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * _HASH_SPACE


def _holdout_mask(ids: pa.Array, fraction: float) -> np.ndarray:
    return np.fromiter((is_holdout(i, fraction) for i in ids.to_pylist()), dtype=bool, count=len(ids))


class _SplitFilter:
    """Ray Data batch function keeping the train (keep_holdout=False) or held-out rows of a pyarrow batch."""

    def __init__(self, fraction: float, keep_holdout: bool, first_variant_only: bool = False):
        self.fraction = fraction
        self.keep_holdout = keep_holdout
        self.first_variant_only = first_variant_only

    def __call__(self, table: pa.Table) -> pa.Table:
        mask = _holdout_mask(table.column("id").combine_chunks(), self.fraction)
        if not self.keep_holdout:
            mask = ~mask
        if self.first_variant_only and "variant" in table.column_names:
            mask &= np.asarray(table.column("variant").to_numpy(zero_copy_only=False)) == 0
        return table.filter(pa.array(mask))


def open_features(cfg: Any):
    """The full row dataset: materialised feature shards (metadata checked) or the online pipeline.

    With train.cache_data the shards are read once on the driver with pyarrow and handed to Ray Data as
    in-memory tables (small sets: no read tasks, no re-reads per epoch); otherwise Ray Data streams them."""
    import ray.data

    tc = cfg.train
    if tc.online:  # reads the curated shards of precompute.input and encodes on the fly
        from pipelines.online import online_dataset, online_metadata

        return online_dataset(cfg), {"mode": "online", "metadata": online_metadata(cfg)}
    from pipelines.feature_schema import check_compatible, read_metadata
    from vosr import storage

    meta = read_metadata(tc.features, tc.s3_endpoint_url)
    check_compatible(meta, cfg)
    files = storage.list_files(tc.features, ".parquet", tc.s3_endpoint_url)
    if not files:
        raise FileNotFoundError(f"no feature shards (*.parquet) under {tc.features}")
    fs, _ = storage.open_fs(tc.features, tc.s3_endpoint_url)
    paths = [f[len("s3://"):] if f.startswith("s3://") else f for f in files]
    info = {"mode": "features", "shards": len(files), "metadata": meta}
    if tc.cache_data:
        import pyarrow.parquet as pq

        tables = [pq.read_table(p, filesystem=fs) for p in paths]
        return tables, info
    return ray.data.read_parquet(paths, filesystem=fs), info


def training_datasets(cfg: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(train dataset, held-out dataset (first variant of each held-out image), info)."""
    import ray.data

    frac = cfg.data.holdout_fraction
    keep_train = _SplitFilter(frac, keep_holdout=False)
    keep_val = _SplitFilter(frac, keep_holdout=True, first_variant_only=True)
    if cfg.train.online:  # split the curated images before they are decoded, degraded and encoded
        from pipelines.online import online_dataset, online_metadata

        info = {"mode": "online", "metadata": online_metadata(cfg)}
        return (online_dataset(cfg, keep_rows=keep_train), online_dataset(cfg, variants=[0], keep_rows=keep_val),
                info)
    data, info = open_features(cfg)
    if isinstance(data, list):  # cached: split on the driver, hand over in-memory tables
        train_tables = [t for t in (keep_train(x) for x in data) if t.num_rows]
        val_tables = [t for t in (keep_val(x) for x in data) if t.num_rows]
        info["train_rows"] = sum(t.num_rows for t in train_tables)
        info["val_rows"] = sum(t.num_rows for t in val_tables)
        if info["train_rows"] == 0:
            raise ValueError("no training rows left after the hold-out split; add data or lower "
                             "data.holdout_fraction")
        if cfg.train.val_images > 0 and info["val_rows"] == 0:
            raise ValueError("no held-out rows for validation; raise data.holdout_fraction or set "
                             "train.val_images=0")
        empty = data[0].schema.empty_table()
        return (ray.data.from_arrow(train_tables or [empty]), ray.data.from_arrow(val_tables or [empty]), info)
    train = data.map_batches(keep_train, batch_format="pyarrow")
    val = data.map_batches(keep_val, batch_format="pyarrow")
    return train, val, info


# --- worker side ----------------------------------------------------------------------------------------------

def decode_batch(batch: pa.Table | dict, device, meta: dict | None = None) -> dict[str, Any]:
    """Feature rows -> {"hq", "lq", "sem": float32 tensors on `device`, "ids": list[str]}."""
    import torch

    from pipelines.feature_schema import decode_feature_rows

    rows = decode_feature_rows(batch, meta)
    return {"hq": rows["hr_latent"].to(device=device, dtype=torch.float32),
            "lq": rows["lr_latent"].to(device=device, dtype=torch.float32),
            "sem": rows["sem_tokens"].to(device=device, dtype=torch.float32),
            "ids": list(rows["id"])}


class BatchStream:
    """Endless micro-batches of this worker's shard, epoch after epoch, with a resumable position."""

    def __init__(self, shard: Any, batch_size: int, seed: int, rank: int, shuffle_buffer: int,
                 device: Any, epoch: int = 0, batch_in_epoch: int = 0, prefetch_batches: int = 1,
                 meta: dict | None = None):
        self.shard = shard
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer
        self.device = device
        self.epoch = int(epoch)
        self.batch_in_epoch = int(batch_in_epoch)
        self.prefetch_batches = prefetch_batches
        self.meta = meta
        self._it = None

    def _open_epoch(self, skip: int) -> None:
        kwargs: dict[str, Any] = {"batch_size": self.batch_size, "batch_format": "pyarrow", "drop_last": True,
                                  "prefetch_batches": self.prefetch_batches}
        if self.shuffle_buffer > 0:
            kwargs["local_shuffle_buffer_size"] = max(self.shuffle_buffer, self.batch_size)
            from vosr.seeding import derive_seed

            kwargs["local_shuffle_seed"] = derive_seed(self.seed, "shuffle", self.rank, self.epoch) % 2**31
        self._it = iter(self.shard.iter_batches(**kwargs))
        for _ in range(skip):
            next(self._it)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._open_epoch(self.batch_in_epoch)
        try:
            batch = next(self._it)
        except StopIteration:
            if self.batch_in_epoch == 0:
                raise ValueError(f"rank {self.rank}: its data shard holds no full micro-batch of "
                                 f"{self.batch_size} rows; use more data or a smaller train.batch_size") from None
            self.epoch += 1
            self.batch_in_epoch = 0
            self._open_epoch(0)
            batch = next(self._it)
        self.batch_in_epoch += 1
        return decode_batch(batch, self.device, self.meta)

    def close(self) -> None:
        self._it = None


def collect_rows(shard: Any, limit: int, device: Any, meta: dict | None = None) -> dict[str, Any] | None:
    """The first `limit` rows of a (non-split) dataset shard as one decoded batch; None when it is empty."""
    tables = []
    count = 0
    for table in shard.iter_batches(batch_size=max(1, limit), batch_format="pyarrow"):
        tables.append(table)
        count += table.num_rows
        if count >= limit:
            break
    if not count:
        return None
    table = pa.concat_tables(tables).slice(0, limit)
    return decode_batch(table, device, meta)
