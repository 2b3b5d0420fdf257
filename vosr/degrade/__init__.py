"""Training-pair degradation (docs/method.md s1) with per-sample seeded randomness (docs/method.md s0).

`degrade(hr01, seeds, cfg)` turns HR images [B, 3, H, W] in [0, 1] into LR images, 8-bit quantised and (with
`resize_back`) at HR size, one torch.Generator per image, plus one JSON-able parameter dict per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .crop import random_crop, upscale_short_side, upscaled_size
from .presets import PRESETS, get_preset

__all__ = ["degrade", "random_crop", "upscale_short_side", "upscaled_size", "PRESETS", "get_preset"]


def degrade(hr01: torch.Tensor, seeds: Sequence[int], cfg, timings: dict | None = None
            ) -> tuple[torch.Tensor, list[dict]]:
    """Degrade a batch; image i draws everything from a generator seeded with seeds[i]. `cfg` is a DegradeConfig.

    The result depends only on (image, seed), never on the batch it is in. Images run one at a time because every
    image draws its own resize factors (sizes differ inside a batch).
    """
    if hr01.ndim != 4 or hr01.shape[1] != 3:
        raise ValueError(f"degrade expects [B, 3, H, W] images, got shape {tuple(hr01.shape)}")
    if len(seeds) != hr01.shape[0]:
        raise ValueError(f"degrade got {hr01.shape[0]} images but {len(seeds)} seeds")
    fn = get_preset(cfg.preset)
    outs, params = [], []
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        lr, p = fn(hr01[i:i + 1].float(), g, cfg, timings)
        outs.append(lr)
        params.append({"preset": cfg.preset, "seed": int(seed), **p})
    return torch.cat(outs, 0), params
