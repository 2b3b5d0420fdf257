"""How the upscaler runs (vosr/upscaler.py): mode, tiling, colour fix, seed and device. Shared by the upscale CLI,
the Ray Serve app and the evaluation runner."""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import COLOR_FIXES, INFERENCE_PRESETS, MODES, QUANTIZE, RNGS
from .schema import option


@dataclass
class InferenceConfig:
    mode: str = option("onestep", "onestep (distilled student, few-step with distill.onestep_steps) or multistep "
                       "(teacher with guidance flow.guidance_scale, flow.steps Euler steps).",
                       choices=list(MODES))
    checkpoint: str = option("", "Checkpoint folder, MLflow model URI (models:/name/version), a model folder released "
                             "by the VOSR authors (args.json + weights) or its hf:// URI (hf://CSWRY/VOSR/VOSR_0.5B_os"
                             "[@revision]; docs/checkpoints.md).")
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
    rng: str = option("vosr", "Random streams: vosr (the posterior sample and the noise from two generators derived "
                      "from the seed, the noise drawn on the CPU) or reference (one generator seeded with the seed "
                      "on the model's device, posterior sample first, then the noise: the authors' scripts' order "
                      "for the first image of a run). Either way a result never depends on its batch.",
                      choices=list(RNGS))
    quantize: str = option("round", "8-bit output: round (once, after the colour fix; unbiased) or reference "
                           "(truncate after decoding and again after the colour fix, as the authors' scripts do).",
                           choices=list(QUANTIZE))
    preset: str = option("", "The released models' benchmark settings, filled in under the file's and --set values: "
                         "realsr (x4, 25 linear Euler steps, guidance -0.5, weak strength 0.15, one step for a "
                         "student, AdaIN, tiles of 512 px, the reference's random streams and 8-bit conversion) or "
                         "screensr (the same with guidance 0.5 and x1: ScreenSR's LQ is already at HR size). "
                         "docs/method.md s8.", choices=["", *INFERENCE_PRESETS])
    compile: bool = option(False, "torch.compile the DiT blocks and final layer with dynamic shapes (one graph for "
                           "every image and tile size; vosr/model/execution.py); the first call pays the compile "
                           "time.")
    device: str = option("auto", "Device: auto, cpu or cuda.", choices=["auto", "cpu", "cuda"])
    dtype: str = option("fp32", "Precision of the DiT and the semantic encoder (cast) and of the autoencoder (autocast): "
                        "fp32, bf16, or fp16 (CUDA only). The sampler's integration and colour fix stay float32.",
                        choices=["fp32", "bf16", "fp16"])
    tile_auto: bool = option(True, "With tile_size 0: tile the DiT and the autoencoder when the untiled run's "
                             "estimated peak memory (vosr/memory.py) exceeds memory_budget_mb, with the largest "
                             "tiles that fit; images that fit run untiled.")
    memory_budget_mb: int = option(0, "Memory an upscale may use, MiB; 0 = 90% of the GPU's memory on CUDA, 75% of "
                                   "the available RAM on CPU.", ge=0)
    max_pixels: int = option(64_000_000, "Largest input (width * height) the upscale CLI and the MLflow model "
                             "decode (a guard against decompression bombs; Serve has serve.max_pixels).", ge=1)
    vae_tile_size: int = option(0, "Autoencoder tile in pixels (overlap a quarter of it; vosr/encoders/tiled.py); "
                                "0 = whole image, unless tile_auto needs tiles.", ge=0)
