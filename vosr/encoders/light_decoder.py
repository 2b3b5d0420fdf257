"""The light SD2.1 decoder of VOSR-0.5B (docs/method.md s2, "Light decoder"; paper s4.1, after AdcSR).

Its shape is the SD2.1 VAE decoder with every width halved: block widths (64, 128, 256, 256), conv_in 4 -> 256, a
mid block of two resnets around one single-head attention of width 256, four up blocks of three resnets each in
reversed width order (upsampling after the first three), GroupNorm(32) + SiLU + conv_out 64 -> 3. That is diffusers'
own `Decoder` (the class inside AutoencoderKL) built with those widths, so this module builds that class and the
released state dict loads into it name for name. It decodes `latent / 0.18215` directly, with no post_quant_conv
(it was trained to absorb that layer); `SD21VAE` does the scaling and the clamp.

Files: the authors' `sd21_lwdecoder.pth`, a torch.save'd dict {"config": {in_channels, out_channels,
block_out_channels, layers_per_block}, "model_state_dict": {...}}, read with torch.load(weights_only=True) (tensors
and plain containers only, never arbitrary objects); or a .safetensors file with that config as JSON in its
metadata under "config" (`convert_light_decoder` writes one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .weights import MissingWeightsError, file_sha256

CONFIG_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block")
DEFAULTS: dict[str, Any] = {"in_channels": 4, "out_channels": 3, "block_out_channels": [64, 128, 256, 256],
                            "layers_per_block": 2, "norm_num_groups": 32}
HOW = ("The released VOSR-0.5B decodes with the authors' sd21_lwdecoder.pth (hf://CSWRY/VOSR/sd21_lwdecoder.pth; "
       "fetched by you beforehand, or named as that hf:// URI); set autoencoder.light_decoder to it, or to 'none' to "
       "decode with the full SD2.1 decoder instead.")


class LightDecoderError(ValueError):
    """A light-decoder file that cannot be read safely or does not fit its config."""


def build_light_decoder(config: dict[str, Any]) -> torch.nn.Module:
    """diffusers' Decoder with the given widths (see the module docstring)."""
    from diffusers.models.autoencoders.vae import Decoder

    cfg = {**DEFAULTS, **{k: config[k] for k in (*CONFIG_KEYS, "norm_num_groups") if k in config}}
    widths = tuple(int(c) for c in cfg["block_out_channels"])
    return Decoder(in_channels=int(cfg["in_channels"]), out_channels=int(cfg["out_channels"]),
                   up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                   layers_per_block=int(cfg["layers_per_block"]), norm_num_groups=int(cfg["norm_num_groups"]),
                   act_fn="silu", norm_type="group", mid_block_add_attention=True)


def read_light_decoder(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict) of a .pth (weights_only) or .safetensors (config in the metadata) light decoder."""
    p = Path(path)
    if not p.is_file():
        raise MissingWeightsError(f"light decoder: {p} not found. {HOW}")
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise LightDecoderError(f"{p}: no 'config' in the safetensors metadata (write it with "
                                    "vosr.encoders.light_decoder.convert_light_decoder)")
        return json.loads(meta["config"]), load_file(str(p), device="cpu")
    try:
        blob = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError and friends: say why nothing was unpickled
        raise LightDecoderError(f"{p}: not loadable as plain tensors and containers (torch.load weights_only=True "
                                f"refused it: {str(exc)[:200]}); this project never unpickles arbitrary objects") \
            from exc
    if not isinstance(blob, dict) or not isinstance(blob.get("config"), dict) \
            or not isinstance(blob.get("model_state_dict"), dict):
        raise LightDecoderError(f"{p}: expected a dict with 'config' and 'model_state_dict' (the authors' "
                                "sd21_lwdecoder.pth layout)")
    return dict(blob["config"]), dict(blob["model_state_dict"])


def load_light_decoder(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """(frozen decoder in eval mode, its config, the file's sha256)."""
    config, state = read_light_decoder(path)
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise LightDecoderError(f"{path}: config lacks {missing}")
    dec = build_light_decoder(config)
    try:
        dec.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LightDecoderError(f"{path}: weights do not fit the decoder its config describes: {str(exc)[:400]}") \
            from exc
    return dec.eval().requires_grad_(False), config, file_sha256(path)


def convert_light_decoder(src: str | Path, dst: str | Path) -> Path:
    """Write the .pth light decoder once as .safetensors (config as JSON metadata); returns `dst`."""
    from safetensors.torch import save_file

    config, state = read_light_decoder(src)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst), metadata={"config": json.dumps(config)})
    return Path(dst)


__all__ = ["HOW", "LightDecoderError", "build_light_decoder", "convert_light_decoder", "load_light_decoder",
           "read_light_decoder"]
