"""How the upscaler runs (vosr/upscaler.py): mode, tiling, colour fix, seed and device. Shared by the upscale CLI,
the Ray Serve app and the evaluation runner."""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import COLOR_FIXES, MODES
from .schema import option


@dataclass
class InferenceConfig:
    mode: str = option("onestep", "onestep (distilled student, few-step with distill.onestep_steps) or multistep "
                       "(teacher with guidance flow.guidance_scale, flow.steps Euler steps).",
                       choices=list(MODES))
    checkpoint: str = option("", "Checkpoint folder or MLflow model URI (models:/name/version).")
    tile_size: int = option(0, "Tile size in pixels of the upsampled image (0 = no tiling; docs/method.md s8: 512 -> "
                            "64 latents at f=8).", ge=0)
    tile_overlap: int = option(0, "Tile overlap in pixels (at least tile/8 latents is used, docs/method.md s8).",
                               ge=0)
    tile_batch: int = option(4, "Tiles run through the DiT per forward pass when tiling.", ge=1)
    color_fix: str = option("adain", "Colour fix against the bicubic LR: adain (default), wavelet (a Gaussian "
                            "low/high swap, named as in the reference), none.",
                            choices=list(COLOR_FIXES))
    upscale: int = option(4, "Upscale factor of the input (x4; the LR is PIL-bicubic upsampled by it first).", ge=1)
    seed: int = option(42, "Noise seed (reference: 42); each image draws from its own generator.")
    compile: bool = option(False, "torch.compile the DiT blocks and final layer with dynamic shapes (one graph for "
                           "every image and tile size; vosr/model/execution.py); the first call pays the compile "
                           "time.")
    device: str = option("auto", "Device: auto, cpu or cuda.", choices=["auto", "cpu", "cuda"])
