"""Degradation presets, by name: `realesrgan` (docs/method.md s1) and `bicubic` (classic x4)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import ops, realesrgan


def _realesrgan(hr: torch.Tensor, g: torch.Generator, cfg, timings: dict | None) -> tuple[torch.Tensor, dict]:
    params = realesrgan.sample_params(g, cfg.realesrgan)
    lr = realesrgan.apply(hr, params, g, cfg.realesrgan, cfg.scale, cfg.resize_back, timings)
    return lr, params


def _bicubic(hr: torch.Tensor, g: torch.Generator, cfg, timings: dict | None) -> tuple[torch.Tensor, dict]:
    """Classic x`scale` pair: antialiased bicubic down to H/scale, 8-bit, then bicubic back up (no randomness)."""
    h, w = hr.shape[-2:]
    lr = ops.quantize8(F.interpolate(hr, size=(h // cfg.scale, w // cfg.scale), mode="bicubic", antialias=True)
                       .clamp(0, 1))
    if cfg.resize_back:
        lr = F.interpolate(lr, size=(h, w), mode="bicubic")
    return ops.quantize8(lr), {"down": "bicubic_antialias", "up": "bicubic" if cfg.resize_back else None}


PRESETS: dict[str, Callable] = {"realesrgan": _realesrgan, "bicubic": _bicubic}


def get_preset(name: str) -> Callable:
    if name not in PRESETS:
        raise KeyError(f"unknown degradation preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]
