"""In-training validation on the held-out split (rank 0): sample, decode, PSNR/SSIM on Y, an image grid.

Samples come from the EMA model (docs/method.md s5: the reference evaluates the EMA) with the objective's sampler:
multi-step with the configured guidance for the teacher, few-step for the student. Latents are decoded with the
configured autoencoder; the reference is the decoded HR latent, so the metric measures the generator alone.
The grid has one row per held-out image: LR (decoded LR latent) | sample | HR.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 [H, W, 3] (rounded)."""
    x = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


def image_grid(rows: list[list[np.ndarray]], pad: int = 2) -> bytes:
    """PNG bytes of a grid of equally sized uint8 RGB tiles."""
    from PIL import Image

    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = tile
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


class Validator:
    """Holds the first `train.val_images` held-out rows, a fixed noise draw and the autoencoder."""

    def __init__(self, cfg: Any, objective: Any, val_shard: Any, device: torch.device, meta: dict | None = None):
        from training.data import collect_rows
        from vosr.encoders import build_autoencoder
        from vosr.seeding import derive_seed, generator

        self.cfg = cfg
        self.objective = objective
        self.device = device
        batch = collect_rows(val_shard, cfg.train.val_images, device, meta)
        if batch is None:
            raise ValueError("validation has no held-out rows; raise data.holdout_fraction or set "
                             "train.val_images=0")
        self.batch = batch
        self.ids = batch.get("ids", [])
        g = generator(derive_seed(cfg.run.seed, "validation-noise"))
        self.noise = torch.randn(batch["lq"].shape, generator=g).to(device=device, dtype=batch["lq"].dtype)
        self.autoencoder = build_autoencoder(cfg.autoencoder, device=device)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> tuple[dict[str, float], bytes]:
        from vosr.metrics import psnr_y, ssim_y

        was_training = model.training
        model.eval()
        try:
            z = self.objective.sample(model, self.batch["lq"], self.batch["sem"], self.noise)
        finally:
            model.train(was_training)
        ae = self.autoencoder
        sr, hr, lr = ae.decode(z.float()), ae.decode(self.batch["hq"].float()), ae.decode(self.batch["lq"].float())
        psnrs, ssims, rows = [], [], []
        for i in range(sr.shape[0]):
            a, b, c = to_uint8(sr[i]), to_uint8(hr[i]), to_uint8(lr[i])
            psnrs.append(psnr_y(a, b))
            ssims.append(ssim_y(a, b))
            rows.append([c, a, b])
        finite = [p for p in psnrs if np.isfinite(p)]
        metrics = {"val/psnr_y": float(np.mean(finite)) if finite else float("inf"),
                   "val/ssim_y": float(np.mean(ssims)),
                   "val/latent_mse": float(torch.mean((z.float() - self.batch["hq"].float()) ** 2))}
        return metrics, image_grid(rows)

    def run(self, model: torch.nn.Module, step: int, logger: Any) -> dict[str, float]:
        metrics, png = self.evaluate(model)
        logger.metrics(metrics, step=step)
        with tempfile.TemporaryDirectory(prefix="vosr-val-") as tmp:
            path = Path(tmp) / f"val_grid_step{step:08d}.png"
            path.write_bytes(png)
            logger.artifact(path, artifact_path="validation")
        return metrics
