"""Semantic embedding for k-means balancing: the configured semantic ViT's final CLS token (DINOv2 CLS features
when a DINOv2 encoder is configured, paper s4.1 "category-level balancing"; the tiny preset's tiny ViT carries
no semantics and only exercises the path).

`ClsEmbedder` is a Ray Data callable class: each actor builds the encoder once and embeds whole batches of
stage-1 rows. Only rows without a category from the URL list are decoded and embedded (listed rows never go
through k-means); their `embedding` column is replaced by the CLS vector, the others get null. The image bytes
are dropped from the batch, so nothing heavier than the vectors moves on.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from PIL import Image

from vosr.imageio import decode_image


def check_semantic_weights(sem_cfg) -> None:
    """Fail on the driver, before any Ray work, when the configured encoder's weights cannot be found (the
    same rule and message as the encoder builder; nothing is ever downloaded)."""
    from pathlib import Path

    from vosr.encoders.weights import MissingWeightsError

    if sem_cfg.path and not Path(sem_cfg.path).expanduser().is_file():
        raise MissingWeightsError(f"curate.balance.embedding=semantic: semantic encoder {sem_cfg.name} weights "
                                  f"file {sem_cfg.path} not found (semantic.path; nothing is downloaded)")
    if sem_cfg.name != "tiny_vit" and not sem_cfg.path and not sem_cfg.allow_random:
        raise MissingWeightsError(f"curate.balance.embedding=semantic needs local {sem_cfg.name} weights: set "
                                  "semantic.path (nothing is downloaded), or use balance.embedding=cheap")


def images_to_batch(images: list[Image.Image], size: int):
    """Decoded RGB images -> float tensor [B, 3, size, size] in [0, 1] (bicubic, aspect ignored as the encoder
    does), so images of any size stack into one encoder batch."""
    import torch

    arr = np.stack([np.asarray(im.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


class ClsEmbedder:
    """Ray Data actor: stage-1 rows (with `image` bytes) -> the same rows with `embedding` = CLS vector."""

    def __init__(self, sem_cfg, max_pixels: int, micro_batch: int = 32, use_gpu: bool = False,
                 threads: int = 1):
        import torch

        from vosr.encoders import build_semantic_cls_encoder

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(threads)))
        self.encoder = build_semantic_cls_encoder(sem_cfg, device=self.device)
        self.size = self.encoder.input_size
        self.max_pixels = int(max_pixels)
        self.micro_batch = max(1, int(micro_batch))

    def embed(self, blobs: list[bytes]) -> np.ndarray:
        """CLS vectors [n, dim] float32 of encoded images, in micro-batches of `micro_batch` in input order."""
        out = []
        for s in range(0, len(blobs), self.micro_batch):
            imgs = [decode_image(b, self.max_pixels) for b in blobs[s:s + self.micro_batch]]
            x = images_to_batch(imgs, self.size).to(self.device)
            out.append(self.encoder(x).cpu().numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.encoder.dim), np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        todo = [i for i, c in enumerate(batch["list_category"].to_pylist()) if c is None]
        vectors: list = [None] * batch.num_rows
        if todo:
            images = batch["image"]
            emb = self.embed([images[i].as_py() for i in todo])
            for i, v in zip(todo, emb):
                vectors[i] = v.tolist()
        batch = batch.drop_columns(["image", "embedding"])
        return batch.append_column("embedding", pa.array(vectors, pa.list_(pa.float32())))
