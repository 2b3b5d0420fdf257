"""Online mode: the precompute stages as a streaming Ray Dataset that training consumes; nothing is written.

    ds = online_dataset(cfg)                       # rows with the feature-shard schema (pipelines/features/schema.py)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=B):
        tensors = decode_feature_rows(batch, online_metadata(cfg))

Same stage functions as the precompute job (pipelines/features/stages.py: read_curated -> make_pairs -> Encoder),
so for the same ids, variants and global seed both modes give identical degraded bytes and equal encodings
(docs/method.md s0). A training loop that wants fresh degradations every epoch passes
`variants=range(e * K, (e + 1) * K)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pipelines import curate_schema
from pipelines.features import schema as feature_schema
from pipelines.features.stages import degrade_and_encode, read_curated, strip_helpers


def online_metadata(cfg) -> dict:
    """What `_vosr_features.json` would say for this config (shapes, dtype, encoder identities)."""
    from pipelines.features.job import encoder_identities

    ae_id, sem_id = encoder_identities(cfg)
    return feature_schema.build_metadata(cfg, ae_id, sem_id)


def _drop_failed(batch):
    import pyarrow.compute as pc

    return strip_helpers(batch.filter(pc.equal(batch.column("error"), "")))


def online_dataset(cfg, variants: Iterable[int] | None = None, keep_rows: Callable | None = None):
    """A streaming ray.data.Dataset of feature rows (id, variant, seed, crop_box, image_size, hr_latent, lr_latent,
    sem_tokens, degrade_params). Bad images are dropped (the materialised job counts them in its stats).
    `keep_rows` (pyarrow table -> filtered table, on the curated columns id/image/kept/path) selects images before
    any decoding or encoding, e.g. one side of training's hold-out split."""
    from jobkit.ray_env import init_ray

    init_ray(cfg)
    pcfg = cfg.precompute
    files = curate_schema.shard_files(pcfg.input, pcfg.s3_endpoint_url)
    if not files:
        raise FileNotFoundError(f"no curated shards under {pcfg.input}/{curate_schema.SHARDS_DIR}")
    vs = list(range(pcfg.variants)) if variants is None else [int(v) for v in variants]
    ds = read_curated(files, pcfg.s3_endpoint_url)
    if keep_rows is not None:
        ds = ds.map_batches(keep_rows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    ds = degrade_and_encode(ds, cfg, vs)
    return ds.map_batches(_drop_failed, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
