"""How much memory an upscale needs, worked out before it runs, and the budget it must fit (`--tile auto`).

The estimate is a sum of parts the upscaler keeps alive at its peak (vosr/upscaler.py):
- resident: what the process holds once the upscaler is loaded, measured then: on CPU the resident set (the
  Python/PyTorch runtime and the weights of the DiT, the semantic encoder and the autoencoder), on CUDA the
  memory PyTorch has allocated on the device (the weights); never less than the weights' bytes;
- full-resolution pixel planes (3 x H x W float32 of the padded x4 image): the bicubic input that is also the
  colour-fix reference, the decoded output, and the 8-bit / PIL copies at the end: PIXEL_PLANES of them;
- the latents of the sampler (noise, LR latent, state, velocity and its tiled accumulator): LATENT_COPIES x the
  LR latent;
- the largest working set of one stage, which runs alone: the autoencoder on one tile (or the whole image)
  (`work_bytes_per_px` of the codec), the DiT on one forward (DIT_ACTIVATIONS x width values per token, the
  SwiGLU hidden and the residual stream dominating; attention uses PyTorch's scaled_dot_product_attention, whose
  CPU flash and CUDA memory-efficient kernels need memory linear in the tokens), the semantic ViT on a batch of
  tile crops.
Each constant is an upper bound set from measurement (benchmarks/bench_upscale_memory.py prints the measured peak
next to the estimate), so a plan that fits the budget by the estimate fits it in practice.

The budget is inference.memory_budget_mb, or when that is 0: 90% of the GPU's memory on CUDA, 75% of the memory
the kernel reports available (MemAvailable) on CPU, read when the upscaler is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

PIXEL_PLANES = 3.5         # padded input/reference, decoded output, the 8-bit output and the PIL copies
LATENT_COPIES = 8          # noise, lq, z, v (+ guidance pair), tiled accumulator and normaliser
DIT_ACTIVATIONS = 16       # values per token and width unit alive in one DiT block (measured ~11 in float32)
SEM_ACTIVATIONS = 24       # values per token and width unit alive in the semantic ViT
CPU_FRACTION = 0.75
CUDA_FRACTION = 0.9
MIB = 2 ** 20


def available_bytes(device) -> int:
    """What the machine can give: the GPU's total memory on CUDA, MemAvailable (else total RAM) on CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * CUDA_FRACTION)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(info.get("MemAvailable", info.get("MemTotal", 0)) * CPU_FRACTION)
    except OSError:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(pages * CPU_FRACTION)


def resident_bytes(device) -> int:
    """Memory held now: the process's resident set on CPU (/proc/self/statm), PyTorch's allocation on CUDA."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def budget_bytes(memory_budget_mb: int, device) -> int:
    return int(memory_budget_mb) * MIB if memory_budget_mb > 0 else available_bytes(device)


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak bytes of one upscale and the parts it is made of."""

    weights: int        # resident at load: runtime + weights (see the module docstring)
    pixels: int
    latents: int
    stages: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return self.weights + self.pixels + self.latents + max(self.stages.values(), default=0)

    def describe(self) -> dict:
        return {"peak_mb": round(self.peak / MIB, 1), "resident_mb": round(self.weights / MIB, 1),
                "pixels_mb": round(self.pixels / MIB, 1), "latents_mb": round(self.latents / MIB, 1),
                **{f"{k}_mb": round(v / MIB, 1) for k, v in self.stages.items()}}


def estimate(*, out_hw: tuple[int, int], batch: int, factor: int, patch: int, latent_channels: int,
             width: int, compute_bytes: int, weight_bytes: int, passes: int, tile_latents: int, tile_batch: int,
             tiles: int, vae_tile_px: int, vae_work: dict[str, int], sem_width: int, sem_tokens: int) -> MemoryPlan:
    """The MemoryPlan of an upscale whose padded output is `out_hw` (see the module docstring).
    `tile_latents`: DiT tile side in latents (0 = whole image); `vae_tile_px`: autoencoder tile (0 = whole)."""
    h, w = out_hw
    plane = 3 * h * w * 4 * batch
    lh, lw = h // factor, w // factor
    latents = LATENT_COPIES * latent_channels * lh * lw * 4 * batch * passes
    if tile_latents:
        tokens = (tile_latents // patch) ** 2 * min(tile_batch, tiles) * batch * passes
    else:
        tokens = (lh // patch) * (lw // patch) * batch * passes
    dit = DIT_ACTIVATIONS * width * tokens * max(compute_bytes, 2) + 2 * width * tokens * 4   # + fp32 residual
    vae_px = min(vae_tile_px, h) * min(vae_tile_px, w) if vae_tile_px else h * w
    vae = max(vae_work.get("encode", 0), vae_work.get("decode", 0)) * vae_px * batch
    crops = min(tile_batch, tiles) * batch if tile_latents else batch
    sem = SEM_ACTIVATIONS * sem_width * sem_tokens * crops * 4
    if tile_latents:     # the tiles' pixel crops are cut before the semantic pass
        sem += 3 * (tile_latents * factor) ** 2 * 4 * crops
    return MemoryPlan(weight_bytes, int(PIXEL_PLANES * plane), latents,
                      {"autoencoder": vae, "dit": dit, "semantic": sem})
