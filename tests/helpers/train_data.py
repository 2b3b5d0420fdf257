"""Feature shards for the training tests, made from real photos with the real tiny encoders.

Each photo is cropped (vosr.degrade.random_crop), degraded (vosr.degrade.degrade, per-image seeds) and encoded
with vosr.features.encode_views (pixel codec + tiny ViT), then written in the feature-shard schema of
pipelines/features/schema.py with its `_vosr_features.json`, exactly the layout pipelines/precompute.py writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image


def make_feature_shards(cfg, photos: list[Path], out: Path, rows_per_shard: int = 4, variants: int = 1) -> Path:
    from pipelines.features import schema as fsch
    from vosr.degrade import degrade, random_crop
    from vosr.encoders import build_autoencoder, build_semantic_encoder
    from vosr.features import encode_views
    from vosr.seeding import generator, sample_seed

    ae = build_autoencoder(cfg.autoencoder)
    sem = build_semantic_encoder(cfg.semantic)
    res = cfg.data.resolution
    schema = fsch.schema_for_config(cfg)
    rows: list[dict] = []
    for path in photos:
        img = Image.open(path).convert("RGB")
        sid = path.stem
        for v in range(variants):
            seed = sample_seed(cfg.run.seed, sid, v)
            crop, box = random_crop(img, res, seed)
            hr = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255.0
            lr, params = degrade(hr, [seed], cfg.degrade)
            hz, lz, tok = encode_views(ae, sem, hr, lr, generator(seed))
            rows.append({"id": sid, "variant": v, "seed": seed, "crop_box": [int(b) for b in box],
                         "image_size": list(img.size), "hr": hz, "lr": lz, "sem": tok,
                         "params": str(params[0])})
    shards = out / fsch.SHARDS_DIR
    shards.mkdir(parents=True, exist_ok=True)
    dtype = cfg.precompute.dtype
    for i in range(0, len(rows), rows_per_shard):
        part = rows[i:i + rows_per_shard]
        table = pa.Table.from_arrays([
            pa.array([r["id"] for r in part], pa.string()),
            pa.array([r["variant"] for r in part], pa.int32()),
            pa.array([r["seed"] for r in part], pa.int64()),
            pa.array([r["crop_box"] for r in part], pa.list_(pa.int32(), 4)),
            pa.array([r["image_size"] for r in part], pa.list_(pa.int32(), 2)),
            fsch.tensor_to_arrow(torch.cat([r["hr"] for r in part]), dtype),
            fsch.tensor_to_arrow(torch.cat([r["lr"] for r in part]), dtype),
            fsch.tensor_to_arrow(torch.cat([r["sem"] for r in part]), dtype),
            pa.array([r["params"] for r in part], pa.string()),
        ], schema=schema)
        pq.write_table(table, shards / f"part-{i // rows_per_shard:05d}.parquet")
    fsch.write_metadata(str(out), fsch.build_metadata(cfg, ae.identity(), sem.identity()))
    return out


def encoded_batch(cfg, rows: list[tuple[str, int, str, str]]) -> pa.Table:
    """What the precompute Encoder hands the feature writer (pipelines/features/writer.py write_parts): the feature
    columns of `cfg`'s schema plus its `src` and `error` helper columns, for (id, variant, src, error) rows; row i's
    latents and tokens are filled with i (the LR latent with -i)."""
    from pipelines.features import schema as fsch

    n = len(rows)
    lat, sem = fsch.latent_shape(cfg), fsch.sem_shape(cfg)
    vals = torch.arange(n, dtype=torch.float32)
    t = pa.table({"id": [r[0] for r in rows], "variant": pa.array([r[1] for r in rows], pa.int32()),
                  "seed": pa.array(range(n), pa.int64()),
                  "crop_box": pa.array([[0, 0, 64, 64]] * n, pa.list_(pa.int32(), 4)),
                  "image_size": pa.array([[64, 64]] * n, pa.list_(pa.int32(), 2)),
                  "hr_latent": fsch.tensor_to_arrow(vals.view(n, 1, 1, 1).expand(n, *lat), "float16"),
                  "lr_latent": fsch.tensor_to_arrow(-vals.view(n, 1, 1, 1).expand(n, *lat), "float16"),
                  "sem_tokens": fsch.tensor_to_arrow(vals.view(n, 1, 1).expand(n, *sem), "float16"),
                  "degrade_params": ["{}"] * n}, schema=fsch.schema_for_config(cfg))
    t = t.append_column("src", pa.array([r[2] for r in rows], pa.string()))
    return t.append_column("error", pa.array([r[3] for r in rows], pa.string()))
