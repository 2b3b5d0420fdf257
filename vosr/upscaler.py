"""Upscale images of any size with a VOSR checkpoint: one-step/few-step (student) or guided multi-step.

Pipeline for a batch of same-size LR images (docs/method.md s8 with the project's decisions of s0):
1. PIL bicubic upsample to exactly (w*u, h*u), to [0, 1] (this is also the colour-fix reference).
2. Reflect-pad to a multiple of downsample*patch so the latent grid patchifies (docs/method.md s0); crop back at the end.
3. Autoencoder-encode the whole padded image once ([-1, 1] in; posterior sample or mode per
   autoencoder.inference_sample_posterior; each image draws from its own seeded generator).
4. Semantic tokens of the whole image, or, when tiling, of each tile's matching pixel crop, encoded once.
5. One full-size noise latent per image from its own seed, so a result never depends on the batch it is in
   (inference.rng: "vosr" draws posterior and noise from two generators derived from the seed; "reference" from one
   generator seeded with the seed, posterior first, on the model's device, as the authors' scripts do).
6. Euler integration with vosr.flow's velocity functions; with tiling the velocity is the Gaussian blend of the
   tile velocities at every step (vosr.tiling.TiledVelocity).
7. Decode the whole latent once, clamp, crop back, colour fix against the bicubic LR (adain default), and convert
   to 8-bit by ROUNDING. The reference converts with ToPILImage, which truncates (floor), before and after its
   colour fix, so its outputs are on average half a grey level darker; rounding is the unbiased choice, and
   inference.quantize=reference reproduces the reference's two truncations (the benchmark presets use it).
A latent no larger than one tile on either side is sampled untiled, as the reference's tiled path does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vosr import flow
from vosr.choices import MODES, QUANTIZE, RNGS, SCHEDULES
from vosr.colorfix import COLOR_FIXES, color_fix
from vosr.seeding import derive_seed
from vosr.tiling import TiledVelocity, ceil_to, reflect_pad, tile_count, tile_grid, tile_size_latents


@dataclass(frozen=True)
class UpscaleOptions:
    """Everything that changes one upscale call. `steps` = 0 means the mode's default."""

    mode: str = "onestep"
    steps: int = 0
    guidance: float = 0.5
    weak_strength: float = 0.15
    schedule: str = "linear"
    tile_size: int = 0
    tile_overlap: int = 0
    tile_batch: int = 4
    color_fix: str = "adain"
    upscale: int = 4
    seed: int = 42
    rng: str = "vosr"
    quantize: str = "round"

    def validate(self) -> UpscaleOptions:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {list(MODES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {list(SCHEDULES)}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix {self.color_fix!r} is not one of {list(COLOR_FIXES)}")
        if self.rng not in RNGS:
            raise ValueError(f"rng {self.rng!r} is not one of {list(RNGS)}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize {self.quantize!r} is not one of {list(QUANTIZE)}")
        for name, lo in (("steps", 0), ("tile_size", 0), ("tile_overlap", 0), ("tile_batch", 1), ("upscale", 1)):
            if int(getattr(self, name)) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if not 0.0 <= self.weak_strength <= 1.0:
            raise ValueError(f"weak_strength must be in [0, 1], got {self.weak_strength}")
        return self

    def replace(self, **changes: Any) -> UpscaleOptions:
        return dataclasses.replace(self, **changes).validate()

    def batch_key(self) -> tuple:
        """Options that must be equal for images to share one forward pass (seed and colour fix need not)."""
        return (self.mode, self.steps, self.guidance, self.weak_strength, self.schedule, self.tile_size,
                self.tile_overlap, self.tile_batch, self.upscale, self.rng, self.quantize)


@dataclass(frozen=True)
class CostPlan:
    """The model work of one upscale, known before any of it runs: `tiles` DiT inputs per step (1 untiled), each
    `area` latents (a tile, or the whole padded latent grid), for `steps` Euler steps of `passes` model passes
    (2 for the guided multi-step mode: conditioned and weak branch, docs/method.md s6; 1 for the student)."""

    tiles: int
    steps: int
    passes: int
    area: int

    @property
    def evaluations(self) -> int:
        """Model evaluations: tiles x steps x guidance passes."""
        return self.tiles * self.steps * self.passes

    def cost(self, ref_area: int) -> float:
        """Evaluations in units of a `ref_area` evaluation: every evaluation counts at least one (per-tile work
        such as the tile's semantic encoding does not shrink with the tile), a larger one by its area ratio."""
        return self.evaluations * max(1.0, self.area / max(1, ref_area))


def options_from_config(cfg) -> UpscaleOptions:
    """Defaults from the config: inference.* plus flow.* (multi-step) and distill.onestep_steps (one-step)."""
    inf = cfg.inference
    return UpscaleOptions(
        mode=inf.mode, steps=0, guidance=cfg.flow.guidance_scale, weak_strength=cfg.flow.weak_strength,
        schedule=cfg.flow.schedule, tile_size=inf.tile_size, tile_overlap=inf.tile_overlap,
        tile_batch=inf.tile_batch, color_fix=inf.color_fix, upscale=inf.upscale, seed=inf.seed, rng=inf.rng,
        quantize=inf.quantize,
    ).validate()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("inference.device=cuda but no CUDA device is available")
    return torch.device(name)


def pil_to_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    arrs = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div_(255.0)


def batch_to_pil(x: torch.Tensor, quantize: str = "round") -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> 8-bit RGB images, rounded to nearest (`quantize="reference"`: truncated, as the
    reference's ToPILImage does)."""
    levels = x.detach().float().clamp(0, 1) * 255.0
    levels = torch.floor(levels) if quantize == "reference" else torch.round(levels)
    arr = levels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in arr]


def bicubic_upsample(img: Image.Image, factor: int) -> Image.Image:
    """PIL bicubic to exactly (w*u, h*u) (docs/method.md s8 preprocessing)."""
    img = img.convert("RGB")
    if factor == 1:
        return img
    return img.resize((img.width * factor, img.height * factor), Image.BICUBIC)


class Upscaler:
    """Load once, upscale many. `checkpoint`: a checkpoint folder (config.json + model.safetensors) or a loaded
    (model, cfg) pair; `cfg`: the run's Config, whose inference/flow options are the defaults of each call.

    The checkpoint's own config decides the model, autoencoder and semantic encoder; a non-empty
    autoencoder.path / semantic.path in `cfg` points at local weights on this machine instead.
    """

    def __init__(self, checkpoint: str | Path | tuple, cfg=None, device: str | None = None,
                 use_ema: bool = True):
        from vosr.encoders import build_autoencoder, build_semantic_encoder

        if isinstance(checkpoint, tuple):
            model, ckpt_cfg = checkpoint[0], checkpoint[1]
            self.meta: dict[str, Any] = {}
            self.checkpoint = "<in-memory>"
        else:
            from vosr.checkpoint import is_checkpoint_folder, load_checkpoint

            folder = str(checkpoint)
            if "://" not in folder and not is_checkpoint_folder(folder):
                raise FileNotFoundError(f"{folder} is not a checkpoint folder (no config.json, nor a released VOSR "
                                        "folder with args.json + weights); pass a folder holding config.json + "
                                        "model.safetensors, a released VOSR folder, or a models:/ or hf:// URI "
                                        "resolved by inference/model_uri.py")
            model, ckpt_cfg, self.meta = load_checkpoint(folder, use_ema=use_ema, device="cpu")
            self.checkpoint = folder
        run_cfg = cfg if cfg is not None else ckpt_cfg
        self.cfg = run_cfg
        self.model_cfg = ckpt_cfg
        self.device = pick_device(device or run_cfg.inference.device)
        ae_cfg = ckpt_cfg.autoencoder
        sem_cfg = ckpt_cfg.semantic
        if cfg is not None and cfg.autoencoder.path:
            ae_cfg = dataclasses.replace(ae_cfg, path=cfg.autoencoder.path)
        if cfg is not None and cfg.autoencoder.light_decoder:
            ae_cfg = dataclasses.replace(ae_cfg, light_decoder=cfg.autoencoder.light_decoder)
        if cfg is not None and cfg.semantic.path:
            sem_cfg = dataclasses.replace(sem_cfg, path=cfg.semantic.path)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.autoencoder = build_autoencoder(ae_cfg, device=self.device)
        self.semantic = build_semantic_encoder(sem_cfg, device=self.device)
        self.sample_posterior = bool(ae_cfg.inference_sample_posterior)
        self.factor = int(self.autoencoder.downsample)
        self.patch = int(getattr(model, "patch_size", ckpt_cfg.model.patch_size))
        self.multiple = self.factor * self.patch
        self.is_student = bool(getattr(model, "is_student", False))
        self.defaults = options_from_config(run_cfg)
        self.onestep_steps = int(run_cfg.distill.onestep_steps)
        self.multistep_steps = int(run_cfg.flow.steps)
        self._ae_name = self.autoencoder.identity().get("name")   # identity() may hash weight files: once

    # --- public API -------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "preset": self.model_cfg.preset, "student": self.is_student,
                "device": str(self.device), "autoencoder": self._ae_name,
                "downsample": self.factor, "patch": self.patch,
                "defaults": dataclasses.asdict(self.defaults)}

    def resolve(self, options: UpscaleOptions | None = None, **overrides: Any) -> UpscaleOptions:
        opts = (options or self.defaults).replace(**overrides) if overrides else (options or self.defaults)
        opts = opts.validate()
        if opts.mode == "multistep" and self.is_student:
            raise ValueError("mode=multistep needs a multi-step (teacher) checkpoint; this checkpoint is the "
                             "one-step student (guidance is distilled into it, docs/method.md s7)")
        if opts.mode == "onestep" and not self.is_student:
            raise ValueError("mode=onestep needs a distilled student checkpoint; this is a multi-step teacher")
        if opts.steps == 0:
            opts = opts.replace(steps=self.onestep_steps if opts.mode == "onestep" else self.multistep_steps)
        return opts

    def plan(self, size: tuple[int, int], options: UpscaleOptions) -> CostPlan:
        """The CostPlan of upscaling an image of `size` (w, h) with resolved `options`; runs nothing."""
        w, h = size
        lh = ceil_to(h * options.upscale, self.multiple) // self.factor
        lw = ceil_to(w * options.upscale, self.multiple) // self.factor
        if self._tiled(lh, lw, options):
            tiles, lt = tile_count(lh, lw, options.tile_size, options.tile_overlap, self.factor, self.patch)
            area = lt * lt
        else:
            tiles, area = 1, lh * lw
        return CostPlan(tiles, max(1, options.steps), 2 if options.mode == "multistep" else 1, area)

    def upscale(self, image: Image.Image, options: UpscaleOptions | None = None, **overrides: Any) -> Image.Image:
        return self.upscale_batch([image], options, **overrides)[0]

    @torch.inference_mode()
    def upscale_batch(self, images: Sequence[Image.Image], options: UpscaleOptions | None = None,
                      seeds: Sequence[int] | None = None, color_fixes: Sequence[str] | None = None,
                      **overrides: Any) -> list[Image.Image]:
        """Upscale same-size images in one batch; per-image seeds and colour fixes may differ."""
        if not images:
            return []
        opts = self.resolve(options, **overrides)
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise ValueError(f"upscale_batch needs images of one size, got {sorted(sizes)}")
        seeds = list(seeds) if seeds is not None else [opts.seed] * len(images)
        fixes = list(color_fixes) if color_fixes is not None else [opts.color_fix] * len(images)
        if len(seeds) != len(images) or len(fixes) != len(images):
            raise ValueError("seeds and color_fixes need one entry per image")
        for fix in fixes:
            if fix not in COLOR_FIXES:
                raise ValueError(f"color_fix {fix!r} is not one of {list(COLOR_FIXES)}")
        up = pil_to_batch([bicubic_upsample(im, opts.upscale) for im in images]).to(self.device)
        out = self._sample(up, opts, seeds)
        if opts.quantize == "reference":   # the reference's colour fix sees the truncated 8-bit decode
            out = torch.floor(out.float() * 255.0) / 255.0
        fixed = torch.cat([color_fix(out[i:i + 1], up[i:i + 1], fixes[i]) for i in range(len(images))])
        return batch_to_pil(fixed, opts.quantize)

    # --- internals --------------------------------------------------------------------------------------------
    def _velocity_maker(self, opts: UpscaleOptions, cache: bool):
        """`cache`: precompute the semantic keys/values once for all steps (whole image with several steps only:
        a tiler holds every tile's velocity function at once and that memory would grow with the tile count)."""
        if opts.mode == "multistep":
            return lambda lq, sem: flow.multistep_velocity_fn(self.model, lq, sem, opts.guidance, opts.weak_strength,
                                                              cache_semantic=cache)
        return lambda lq, sem: flow.fewstep_velocity_fn(self.model, lq, sem, cache_semantic=cache)

    def _timesteps(self, opts: UpscaleOptions) -> torch.Tensor:
        # the student's few-step sampler always runs on a linear schedule (docs/method.md s7)
        return flow.timesteps(opts.steps, opts.schedule if opts.mode == "multistep" else "linear")

    def _encode(self, padded01: torch.Tensor, seeds: Sequence[int], rng: str = "vosr"
                ) -> tuple[torch.Tensor, list[torch.Generator] | None]:
        """Latents, and for rng "reference" each image's generator (the posterior sample drawn, the noise next)."""
        lats, gens = [], []
        for i, seed in enumerate(seeds):
            first = int(seed) if rng == "reference" else derive_seed(int(seed), "posterior")
            g = torch.Generator(device=self.device).manual_seed(first)
            lats.append(self.autoencoder.encode(padded01[i:i + 1] * 2 - 1, sample=self.sample_posterior,
                                                generator=g))
            gens.append(g)
        return torch.cat(lats).float(), (gens if rng == "reference" else None)

    def _noise(self, lq: torch.Tensor, seeds: Sequence[int], gens: list[torch.Generator] | None = None
               ) -> torch.Tensor:
        if gens is not None:   # rng "reference": continue each image's stream on the model's device
            return torch.cat([torch.randn((1, *lq.shape[1:]), generator=g, device=self.device, dtype=torch.float32)
                              for g in gens]).to(lq.dtype)
        out = []
        for seed in seeds:
            g = torch.Generator(device="cpu").manual_seed(int(seed))
            out.append(torch.randn(lq.shape[1:], generator=g, dtype=torch.float32))
        return torch.stack(out).to(self.device, lq.dtype)

    def _tile_tokens(self, padded: torch.Tensor, grid, chunk: int) -> list[torch.Tensor]:
        """Semantic tokens of every tile's pixel crop, encoded once before sampling, `chunk` tiles per call."""
        b = padded.shape[0]
        out: list[torch.Tensor] = []
        for start in range(0, len(grid.tiles), chunk):
            tiles = grid.tiles[start:start + chunk]
            crops = torch.cat([padded[(..., *t.pixel_slice(self.factor))] for t in tiles])
            tokens = self.semantic(crops).float()
            out += [tokens[k * b:(k + 1) * b] for k in range(len(tiles))]
        return out

    def _tiled(self, lh: int, lw: int, opts: UpscaleOptions) -> bool:
        """Tiling is on and the latent is larger than one tile on some side (the reference's fast path otherwise:
        docs/method.md s8)."""
        if opts.tile_size <= 0:
            return False
        lt = tile_size_latents(opts.tile_size, self.factor, self.patch)
        return lh > lt or lw > lt

    def _sample(self, up01: torch.Tensor, opts: UpscaleOptions, seeds: Sequence[int]) -> torch.Tensor:
        padded, (h, w) = reflect_pad(up01, self.multiple)
        lq, gens = self._encode(padded, seeds, opts.rng)
        noise = self._noise(lq, seeds, gens)
        lh, lw = lq.shape[-2:]
        tiled = self._tiled(lh, lw, opts)
        make = self._velocity_maker(opts, cache=not tiled and opts.steps > 1)
        if tiled:
            grid = tile_grid(lh, lw, opts.tile_size, opts.tile_overlap, self.factor, self.patch)
            sem_tiles = self._tile_tokens(padded, grid, opts.tile_batch)
            velocity = TiledVelocity(make, lq, sem_tiles, grid, opts.tile_batch)
        else:
            velocity = make(lq, self.semantic(padded).float())
        z0 = flow.euler_sample(velocity, noise, self._timesteps(opts))
        x = self.autoencoder.decode(z0).clamp(-1, 1)
        return ((x[:, :, :h, :w] + 1) / 2).clamp(0, 1)


def load_upscaler(checkpoint: str, cfg=None, device: str | None = None) -> Upscaler:
    """A checkpoint folder; `models:/` URIs are resolved by inference/model_uri.py before this is called."""
    return Upscaler(checkpoint, cfg, device=device)
