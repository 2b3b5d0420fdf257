"""The stages shared by the materialised precompute (pipelines/features/job.py) and the online dataset
(pipelines/features/online.py): the same functions in the same order, so both give equal rows for equal
(id, variant, seed).

    read_curated       curated kept rows (id, image bytes) as a Ray Dataset, with the path of their shard
    make_pairs         CPU task: decode -> per variant: seeded crop -> seeded degradation -> uint8 HR/LR pairs
    Encoder            actor: (HR, LR) -> HR latent, LR latent, semantic tokens (vosr.features.encode_views)

Seeds per (global seed, id, variant) (vosr.seeding.sample_seed): purpose "degrade" is the row's `seed` column and
drives the degradation; "crop" picks the crop; "encode" drives the autoencoder's posterior sample.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from pipelines.features.schema import schema_for_config, tensor_to_arrow
from vosr import storage

CURATED_COLUMNS = ["id", "image"]  # plus "kept"
HELPER_COLUMNS = ("src", "error")  # travel with the rows between stages; never written


READ_NUM_CPUS = 0.25  # reading a curated shard is I/O and Parquet decoding, not the degradation's CPU work
READ_BATCH_ROWS = 64  # rows per output block of the read (64 x a few hundred KB of image bytes)


def read_curated(files: list[str], endpoint_url: str = ""):
    """Kept rows of the given curated shard files, with their shard path in column `path`.

    The files are already listed by the caller (the plan), so the dataset starts from that list on the driver
    (`from_items`: paths only) and reads each file in a task of READ_NUM_CPUS CPUs, in blocks of READ_BATCH_ROWS.
    `ray.data.read_parquet` would list them again in a ListFiles task of one whole CPU, which on a small node
    waits behind the encoder actor (~10 s of fixed cost on 2 CPUs, docs/scale.md s5)."""
    import ray.data

    items = [{"uri": f, "path": storage.open_fs(f, endpoint_url)[1]} for f in files]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4096)))  # ~a file per task
    # Dropped rows (kept = false, no image bytes) are skipped in make_pairs; see pipelines/curate_schema.py.
    return ds.map_batches(_read_files, fn_kwargs={"endpoint_url": endpoint_url}, batch_size=1,
                          batch_format="pyarrow", num_cpus=READ_NUM_CPUS)


def _read_files(batch: pa.Table, endpoint_url: str = ""):
    """Task: the rows (CURATED_COLUMNS, kept, path) of each curated shard named in the batch, READ_BATCH_ROWS
    rows at a time (a generator: one block each, so a big shard never sits in one block)."""
    import pyarrow.parquet as pq

    for uri, path in zip(batch.column("uri").to_pylist(), batch.column("path").to_pylist()):
        fs, fs_path = storage.open_fs(uri, endpoint_url)
        with fs.open_input_file(fs_path) as f:
            pf = pq.ParquetFile(f)
            for b in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=CURATED_COLUMNS + ["kept"]):
                t = pa.Table.from_batches([b])
                yield t.append_column("path", pa.array([path] * t.num_rows, pa.string()))


def make_pairs(batch: dict[str, np.ndarray], cfg_dict: dict, variants: list[int]) -> dict[str, np.ndarray]:
    """Decode each curated image once, then for every variant: seeded crop, seeded degradation.

    A bad image gives one row per variant with `error` set to its reason code (counted downstream, never fatal).
    """
    import cv2
    import torch

    from jobkit.config import config_from_dict
    from vosr.degrade import degrade, random_crop, upscaled_size
    from vosr.imageio import ImageDecodeError, decode_image
    from vosr.seeding import sample_seed

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cfg = config_from_dict(cfg_dict)
    res, gseed = int(cfg.data.resolution), int(cfg.run.seed)
    max_pixels = int(cfg.curate.filters.max_pixels)
    cols: dict[str, list] = {k: [] for k in ("id", "variant", "seed", "crop_box", "image_size", "hr", "lr",
                                             "degrade_params", "src", "error")}
    blank = np.zeros((res, res, 3), np.uint8)
    for sid, data, src, kept in zip(batch["id"], batch["image"], batch["path"], batch["kept"]):
        if not kept:
            continue
        sid = str(sid)
        try:
            img = decode_image(bytes(data) if data is not None else b"", max_pixels)
            error = ""
        except ImageDecodeError as exc:
            img, error = None, f"decode:{exc.reason}"
        for v in variants:
            seed = sample_seed(gseed, sid, v, "degrade")
            row = {"id": sid, "variant": v, "seed": seed, "src": str(src), "error": error,
                   "crop_box": [0, 0, 0, 0], "image_size": [0, 0], "hr": blank, "lr": blank, "degrade_params": "{}"}
            if img is not None:
                try:
                    crop, box = random_crop(img, res, sample_seed(gseed, sid, v, "crop"))
                    hr = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0
                    lr, params = degrade(hr, [seed], cfg.degrade)
                    row.update(crop_box=box, image_size=list(upscaled_size(img.size, res)), hr=crop,
                               lr=_to_uint8(lr[0]), degrade_params=json.dumps(params[0], sort_keys=True))
                except (ValueError, RuntimeError) as exc:  # e.g. a JPEG encoder failure: count, don't crash
                    row["error"] = f"degrade:{type(exc).__name__}"
            for k in cols:
                cols[k].append(row[k])
    return {
        "id": np.array(cols["id"], dtype=object),
        "variant": np.array(cols["variant"], dtype=np.int32),
        "seed": np.array(cols["seed"], dtype=np.int64),
        "crop_box": np.array(cols["crop_box"], dtype=np.int32).reshape(-1, 4),
        "image_size": np.array(cols["image_size"], dtype=np.int32).reshape(-1, 2),
        "hr": np.stack(cols["hr"]) if cols["hr"] else np.zeros((0, res, res, 3), np.uint8),
        "lr": np.stack(cols["lr"]) if cols["lr"] else np.zeros((0, res, res, 3), np.uint8),
        "degrade_params": np.array(cols["degrade_params"], dtype=object),
        "src": np.array(cols["src"], dtype=object),
        "error": np.array(cols["error"], dtype=object),
    }


def _to_uint8(x) -> np.ndarray:
    """[3, H, W] in [0, 1], already 8-bit quantised -> uint8 [H, W, 3] (exact)."""
    return x.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


class Encoder:
    """Actor of the encoder pool: builds the autoencoder and semantic encoder once, encodes batches of pairs."""

    def __init__(self, cfg_dict: dict):
        import torch

        from jobkit.config import config_from_dict
        from vosr.encoders import build_autoencoder, build_semantic_encoder

        self.cfg = config_from_dict(cfg_dict)
        use_cuda = self.cfg.precompute.num_gpus_per_encoder > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if not use_cuda:
            torch.set_num_threads(max(1, int(self.cfg.precompute.num_cpus_per_encoder)))
        self.autoencoder = build_autoencoder(self.cfg.autoencoder, device=self.device)
        self.semantic = build_semantic_encoder(self.cfg.semantic, device=self.device)
        self.schema = schema_for_config(self.cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        from vosr.features import encode_views
        from vosr.seeding import generator, sample_seed

        dtype = self.cfg.precompute.dtype
        n = len(batch["id"])
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        lat = [None, None, None]
        shapes = [self.schema.field(c).metadata[b"vosr.shape"] for c in ("hr_latent", "lr_latent", "sem_tokens")]
        shapes = [tuple(json.loads(s)) for s in shapes]
        full = [torch.zeros((n, *s)) for s in shapes]
        if ok.any():
            idx = np.nonzero(ok)[0]
            hr = torch.from_numpy(np.ascontiguousarray(batch["hr"][idx])).permute(0, 3, 1, 2).float() / 255.0
            lr = torch.from_numpy(np.ascontiguousarray(batch["lr"][idx])).permute(0, 3, 1, 2).float() / 255.0
            gens = [generator(sample_seed(self.cfg.run.seed, str(batch["id"][i]), int(batch["variant"][i]),
                                          "encode"), self.device) for i in idx]
            lat = encode_views(self.autoencoder, self.semantic, hr.to(self.device), lr.to(self.device), gens)
            for f, t in zip(full, lat):
                f[torch.from_numpy(idx)] = t.cpu()
        cols = {
            "id": pa.array([str(v) for v in batch["id"]], pa.string()),
            "variant": pa.array(batch["variant"], pa.int32()),
            "seed": pa.array(batch["seed"], pa.int64()),
            "crop_box": pa.FixedSizeListArray.from_arrays(pa.array(batch["crop_box"].reshape(-1), pa.int32()), 4),
            "image_size": pa.FixedSizeListArray.from_arrays(pa.array(batch["image_size"].reshape(-1), pa.int32()),
                                                            2),
            "hr_latent": tensor_to_arrow(full[0], dtype),
            "lr_latent": tensor_to_arrow(full[1], dtype),
            "sem_tokens": tensor_to_arrow(full[2], dtype),
            "degrade_params": pa.array([str(v) for v in batch["degrade_params"]], pa.string()),
        }
        table = pa.table(cols, schema=self.schema)
        table = table.append_column("src", pa.array([str(v) for v in batch["src"]], pa.string()))
        return table.append_column("error", pa.array([str(v) for v in batch["error"]], pa.string()))


# --- stated peaks (bytes) of the stages' tasks and actors: Ray `memory` reservations and `vosr plan` ------------

DECODE_BYTES_PER_PIXEL = 12  # a decode at the pixel cap: the decoder's buffer, the RGB conversion, the numpy copy
DEGRADE_WORK_FLOATS = 24  # float32 [3, res, res] tensors alive at once in one Real-ESRGAN degradation (assumption)
ENCODER_BATCH_COPIES = 4  # encoder host memory per batch row: uint8 pairs, float inputs, float outputs, Arrow


# Parameter counts of the encoders' published weights x 4 bytes (fp32 on the host while loading): SD 2.1 VAE
# 83.7M, Qwen-Image VAE ~127M, DINOv2 ViT-B/14 86.6M, ViT-L/14 304M.
ENCODER_WEIGHT_BYTES = {"pixel": 0, "sd21": int(83.7e6 * 4), "qwen2d": int(127e6 * 4), "tiny_vit": 1 << 20,
                        "dinov2_vitb14": int(86.6e6 * 4), "dinov2_vitl14": int(304e6 * 4)}


def read_task_peak_bytes(max_image_bytes: int) -> int:
    """A curated-shard read task: one block of READ_BATCH_ROWS rows of image bytes (each at most the crawl's
    byte cap) twice (the decoded batch, the block with its path column), plus 16 MiB of fixed buffers."""
    return 2 * READ_BATCH_ROWS * int(max_image_bytes) + (16 << 20)


def degrade_task_peak_bytes(batch_images: int, variants: int, resolution: int, max_pixels: int) -> int:
    """One make_pairs call: one image decoded at a time (at most max_pixels), its variants' degradation work, and
    the batch's uint8 HR/LR pairs twice (the lists and the stacked arrays)."""
    res2 = int(resolution) ** 2
    pairs = int(batch_images) * int(variants) * 2 * res2 * 3
    return DECODE_BYTES_PER_PIXEL * int(max_pixels) + DEGRADE_WORK_FLOATS * res2 * 3 * 4 + 2 * pairs + (16 << 20)


def encoder_peak_bytes(batch_rows: int, resolution: int, row_bytes_out: int, weight_bytes: int) -> int:
    """One encoder actor's host memory: the encoders' weights (loaded on the host before they move to the GPU)
    and ENCODER_BATCH_COPIES copies of a batch (uint8 pairs, float32 inputs, float32 outputs, the Arrow table)."""
    per_row = 2 * int(resolution) ** 2 * 3 * 4 + 2 * int(row_bytes_out)
    return int(weight_bytes) + ENCODER_BATCH_COPIES * int(batch_rows) * per_row + (256 << 20)


def degrade_and_encode(ds, cfg, variants: list[int]):
    """The shared middle of both modes: make_pairs as CPU tasks, then the encoder actor pool."""
    from jobkit.ray_env import memory_reservation
    from pipelines.features.writer import schema_row_bytes

    pc = cfg.precompute
    cfg_dict = cfg.to_dict()
    res, k = int(cfg.data.resolution), len(variants)
    weights = ENCODER_WEIGHT_BYTES.get(cfg.autoencoder.name, 0) + ENCODER_WEIGHT_BYTES.get(cfg.semantic.name, 0)
    degrade_mem = memory_reservation(degrade_task_peak_bytes(pc.degrade_batch_size, k, res,
                                                             cfg.curate.filters.max_pixels))
    encode_mem = memory_reservation(encoder_peak_bytes(pc.batch_size, res, schema_row_bytes(schema_for_config(cfg)),
                                                       weights))
    ds = ds.map_batches(make_pairs, fn_kwargs={"cfg_dict": cfg_dict, "variants": list(variants)},
                        batch_size=pc.degrade_batch_size, batch_format="numpy", num_cpus=pc.num_cpus_per_degrade,
                        **({"memory": degrade_mem} if degrade_mem else {}))
    return ds.map_batches(Encoder, fn_constructor_kwargs={"cfg_dict": cfg_dict}, batch_size=pc.batch_size,
                          batch_format="numpy", concurrency=pc.encoder_concurrency,
                          num_gpus=pc.num_gpus_per_encoder or None, num_cpus=pc.num_cpus_per_encoder,
                          **({"memory": encode_mem} if encode_mem else {}))


def strip_helpers(table: pa.Table) -> pa.Table:
    return table.drop_columns([c for c in HELPER_COLUMNS if c in table.column_names])

