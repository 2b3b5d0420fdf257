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

Precision: inference.dtype (fp32 | bf16 | fp16; fp16 on CUDA only) casts the DiT and the semantic encoder to that
dtype and runs the model passes and the autoencoder under torch.autocast; the Euler integration, the residual
stream of the DiT blocks, the colour fix and the 8-bit conversion stay float32.
Memory: with tile_auto (the default) an image whose estimated peak (vosr.memory) exceeds the budget is sampled in
tiles and its autoencoder passes are tiled (vosr.encoders.tiled), each with the largest tile that fits; small
images run exactly as untiled.

Python API: `Upscaler.from_pretrained(uri)` (a folder, s3://, models:/name@alias, hf://..., resolved by
vosr.model_uri), then
`up(image)` or `up.upscale(image, seed=7)` on a PIL image, a numpy array (H x W x 3, uint8 or float in [0, 1]) or
a torch tensor ([3, H, W] or [B, 3, H, W] in [0, 1]); the result has the input's kind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vosr import flow
from vosr.choices import MODES, QUANTIZE, RNGS, SCHEDULES
from vosr.colorfix import COLOR_FIXES, color_fix, color_fix_inplace
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
    tile_auto: bool = True     # tile (DiT and autoencoder) when the untiled run would not fit the memory budget
    vae_tile: int = 0          # autoencoder tile in pixels (0 = whole image unless tile_auto needs tiles)

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
        for name, lo in (("steps", 0), ("tile_size", 0), ("tile_overlap", 0), ("tile_batch", 1), ("upscale", 1),
                         ("vae_tile", 0)):
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
                self.tile_overlap, self.tile_batch, self.upscale, self.rng, self.quantize, self.tile_auto,
                self.vae_tile)


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
        tile_batch=inf.tile_batch, color_fix=inf.color_fix, upscale=inf.upscale, seed=inf.seed,
        rng=inf.rng, quantize=inf.quantize, tile_auto=inf.tile_auto, vae_tile=inf.vae_tile_size,
    ).validate()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DIT_TILE_CHOICES = (2048, 1536, 1024, 768, 512, 384, 256, 128)   # pixels of the x4 image, largest first
VAE_TILE_CHOICES = (2048, 1024, 768, 512, 384, 256, 128)
LARGE_IMAGE_PX = 4_000_000   # above this many output pixels the colour fix runs in place, band by band


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 | bf16 | fp16 -> torch dtype; fp16 only on CUDA (CPU kernels for it are slow or missing: use bf16)."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPES)}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError(f"dtype fp16 needs a CUDA device (this one is {device.type}); use bf16 on CPU")
    return DTYPES[name]


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


class _Float32Out:
    """The model with float32 outputs: under bf16/fp16 the DiT's last projection yields half precision, and the
    guidance combination and the Euler update must not be done in it. Other attributes pass through."""

    def __init__(self, model):
        self._model = model

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs).float()

    def __getattr__(self, name):
        return getattr(self._model, name)


class Upscaler:
    """Load once, upscale many. `checkpoint`: a checkpoint folder (config.json + model.safetensors) or a loaded
    (model, cfg) pair; `cfg`: the run's Config, whose inference/flow options are the defaults of each call.

    The checkpoint's own config decides the model, autoencoder and semantic encoder; a non-empty
    autoencoder.path / semantic.path in `cfg` points at local weights on this machine instead.
    `dtype` (fp32 | bf16 | fp16) and `memory_budget_mb` default to inference.dtype / inference.memory_budget_mb.
    A loaded model passed in is cast to `dtype` in place.
    """

    def __init__(self, checkpoint: str | Path | tuple, cfg=None, device: str | None = None,
                 use_ema: bool = True, dtype: str | None = None, memory_budget_mb: int | None = None):
        from vosr.encoders import build_autoencoder, build_semantic_encoder
        from vosr.memory import budget_bytes, resident_bytes

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
                                        "model.safetensors or a released VOSR folder, or use "
                                        "Upscaler.from_pretrained for s3://, models:/ and hf:// URIs")
            model, ckpt_cfg, self.meta = load_checkpoint(folder, use_ema=use_ema, device="cpu")
            self.checkpoint = folder
        run_cfg = cfg if cfg is not None else ckpt_cfg
        self.cfg = run_cfg
        self.model_cfg = ckpt_cfg
        self.device = pick_device(device or run_cfg.inference.device)
        self.dtype_name = dtype or run_cfg.inference.dtype
        self.dtype = pick_dtype(self.dtype_name, self.device)
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
        if self.dtype != torch.float32:
            self.model.to(self.dtype)
            self.semantic.to(self.dtype)
        if run_cfg.inference.compile:  # dynamic shapes: one graph for every image and tile size
            from vosr.model.execution import compile_dit

            compile_dit(self.model, dynamic=True)
        self.sample_posterior = bool(ae_cfg.inference_sample_posterior)
        self.factor = int(self.autoencoder.downsample)
        self.patch = int(getattr(model, "patch_size", ckpt_cfg.model.patch_size))
        self.multiple = self.factor * self.patch
        self.is_student = bool(getattr(model, "is_student", False))
        self.defaults = options_from_config(run_cfg)
        self.onestep_steps = int(run_cfg.distill.onestep_steps)
        self.multistep_steps = int(run_cfg.flow.steps)
        budget = run_cfg.inference.memory_budget_mb if memory_budget_mb is None else memory_budget_mb
        self.memory_budget = budget_bytes(int(budget), self.device)
        weights = sum(t.numel() * t.element_size() for m in (self.model, self.semantic)
                      for t in [*m.parameters(), *m.buffers()]) + self._codec_bytes()
        self._weight_bytes = max(weights, resident_bytes(self.device))    # runtime + weights as loaded
        self._warned_budget = False
        self.on_progress = None   # called with a count: 1 per autoencoder pass, 1 per tile model evaluation
        self._ae_name = self.autoencoder.identity().get("name")   # identity() may hash weight files: once

    @classmethod
    def from_pretrained(cls, uri: str | Path, cfg=None, *, device: str | None = None, dtype: str | None = None,
                        memory_budget_mb: int | None = None, cache_dir: str | Path | None = None,
                        tracking_uri: str = "", registry_uri: str = "", endpoint_url: str = "",
                        use_ema: bool = True) -> Upscaler:
        """An Upscaler for a model anywhere vosr.model_uri resolves: a checkpoint folder, s3://bucket/prefix,
        models:/name@alias, models:/name/version, runs:/id/path, hf://owner/repo/folder (a released model). MLflow
        URIs use `tracking_uri` / `registry_uri`, else MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI; remote models
        are cached under `cache_dir` (else $VOSR_MODEL_CACHE, else ~/.cache/vosr/models)."""
        from vosr.model_uri import resolve

        folder = resolve(str(uri), endpoint_url=endpoint_url, tracking_uri=tracking_uri,
                         registry_uri=registry_uri, cache_root=cache_dir)
        up = cls(folder, cfg, device=device, use_ema=use_ema, dtype=dtype, memory_budget_mb=memory_budget_mb)
        up.source = str(uri)
        return up

    def _codec_bytes(self) -> int:
        fn = getattr(self.autoencoder, "parameter_bytes", None)
        return int(fn()) if fn is not None else 0

    # --- public API -------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "preset": self.model_cfg.preset, "student": self.is_student,
                "device": str(self.device), "dtype": self.dtype_name, "autoencoder": self._ae_name,
                "downsample": self.factor, "patch": self.patch,
                "memory_budget_mb": round(self.memory_budget / 2**20), "defaults": dataclasses.asdict(self.defaults)}

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

    def _padded_hw(self, size: tuple[int, int], upscale: int) -> tuple[int, int]:
        w, h = size
        return ceil_to(h * upscale, self.multiple), ceil_to(w * upscale, self.multiple)

    def memory_plan(self, size: tuple[int, int], options: UpscaleOptions, batch: int = 1):
        """The estimated peak memory (vosr.memory.MemoryPlan) of upscaling `batch` images of `size` (w, h) with
        `options` as given (no automatic tiling applied)."""
        from vosr.memory import estimate

        ph, pw = self._padded_hw(size, options.upscale)
        lh, lw = ph // self.factor, pw // self.factor
        tiles, lt = (tile_count(lh, lw, options.tile_size, options.tile_overlap, self.factor, self.patch)
                     if self._tiled(lh, lw, options) else (1, 0))
        sem_spec = getattr(self.semantic, "num_tokens", 0), getattr(getattr(self.semantic, "vit", None),
                                                                      "embed_dim", 0)
        return estimate(out_hw=(ph, pw), batch=batch, factor=self.factor, patch=self.patch,
                        latent_channels=int(getattr(self.autoencoder, "latent_channels", 3 * self.factor ** 2)),
                        width=int(getattr(self.model, "hidden_size", 0)),
                        compute_bytes=torch.finfo(self.dtype).bits // 8, weight_bytes=self._weight_bytes,
                        passes=2 if options.mode == "multistep" else 1, tile_latents=lt,
                        tile_batch=options.tile_batch, tiles=tiles, vae_tile_px=options.vae_tile,
                        vae_work=dict(getattr(self.autoencoder, "work_bytes_per_px", {})),
                        sem_width=int(sem_spec[1]), sem_tokens=int(sem_spec[0]))

    def fit_memory(self, size: tuple[int, int], options: UpscaleOptions, batch: int = 1) -> UpscaleOptions:
        """`options` with the tiles the memory budget needs: unchanged when tile_auto is off or the untiled run
        fits; else the largest DiT tile and autoencoder tile (from DIT_TILE_CHOICES / VAE_TILE_CHOICES) whose
        estimate fits. Explicit tile sizes are kept. Warns once when even the smallest tiles exceed the budget."""
        if not options.tile_auto or (options.tile_size > 0 and options.vae_tile > 0):
            return options
        plan = self.memory_plan(size, options, batch)
        if plan.peak <= self.memory_budget:
            return options
        ph, pw = self._padded_hw(size, options.upscale)
        side = max(ph, pw)
        base = plan.weights + plan.pixels + plan.latents
        changes: dict[str, int] = {}
        if options.vae_tile == 0 and plan.stages["autoencoder"] and \
                base + plan.stages["autoencoder"] > self.memory_budget:
            cands = [t for t in VAE_TILE_CHOICES if t < side] or [VAE_TILE_CHOICES[-1]]
            fits = [t for t in cands if base + self.memory_plan(size, options.replace(vae_tile=t),
                                                                batch).stages["autoencoder"] <= self.memory_budget]
            changes["vae_tile"] = fits[0] if fits else cands[-1]
        if options.tile_size == 0 and base + plan.stages["dit"] + plan.stages["semantic"] > self.memory_budget:
            cands = [t for t in DIT_TILE_CHOICES if t < side] or [DIT_TILE_CHOICES[-1]]

            def need(t: int) -> int:
                st = self.memory_plan(size, options.replace(tile_size=t), batch).stages
                return base + max(st["dit"], st["semantic"])

            fits = [t for t in cands if need(t) <= self.memory_budget]
            changes["tile_size"] = fits[0] if fits else cands[-1]
        out = options.replace(**changes) if changes else options
        final = self.memory_plan(size, out, batch)
        if final.peak > self.memory_budget and not self._warned_budget:
            self._warned_budget = True
            warnings.warn(f"an image of {size[0]}x{size[1]} needs about {final.peak / 2**20:.0f} MiB even with "
                          f"{out.tile_size} px tiles (autoencoder tiles {out.vae_tile} px), over the memory budget "
                          f"of {self.memory_budget / 2**20:.0f} MiB (inference.memory_budget_mb); running anyway",
                          stacklevel=3)
        return out

    def plan(self, size: tuple[int, int], options: UpscaleOptions) -> CostPlan:
        """The CostPlan of upscaling an image of `size` (w, h) with resolved `options` (after the automatic
        tiling of fit_memory, as the run would do it); runs nothing."""
        options = self.fit_memory(size, options)
        ph, pw = self._padded_hw(size, options.upscale)
        lh, lw = ph // self.factor, pw // self.factor
        if self._tiled(lh, lw, options):
            tiles, lt = tile_count(lh, lw, options.tile_size, options.tile_overlap, self.factor, self.patch)
            area = lt * lt
        else:
            tiles, area = 1, lh * lw
        return CostPlan(tiles, max(1, options.steps), 2 if options.mode == "multistep" else 1, area)

    def __call__(self, image: Any, options: UpscaleOptions | None = None, **overrides: Any) -> Any:
        """Same as `upscale`."""
        return self.upscale(image, options, **overrides)

    def upscale(self, image: Any, options: UpscaleOptions | None = None, **overrides: Any) -> Any:
        """One image (PIL, numpy H x W x 3 or H x W, torch [3, H, W]) or a torch batch [B, 3, H, W], or a list of
        same-size images; returns the same kind. uint8 / PIL inputs give 8-bit results (rounded); float inputs in
        [0, 1] give float32 results in [0, 1], not quantised."""
        if isinstance(image, (list, tuple)):
            return self.upscale_batch(list(image), options, **overrides)
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            return self.upscale_batch([image], options, **overrides)[0]
        return self.upscale_batch([image], options, **overrides)[0]

    @torch.inference_mode()
    def upscale_batch(self, images: Sequence[Any], options: UpscaleOptions | None = None,
                      seeds: Sequence[int] | None = None, color_fixes: Sequence[str] | None = None,
                      **overrides: Any) -> list[Any]:
        """Upscale same-size images in one batch; per-image seeds and colour fixes may differ. A torch entry may
        be a batch [B, 3, H, W] (B images); seeds and colour fixes are then per entry."""
        if not images:
            return []
        opts = self.resolve(options, **overrides)
        batch, kinds, counts = _to_batch(images, opts.upscale)
        seeds = list(seeds) if seeds is not None else [opts.seed] * len(images)
        fixes = list(color_fixes) if color_fixes is not None else [opts.color_fix] * len(images)
        if len(seeds) != len(images) or len(fixes) != len(images):
            raise ValueError("seeds and color_fixes need one entry per image")
        for fix in fixes:
            if fix not in COLOR_FIXES:
                raise ValueError(f"color_fix {fix!r} is not one of {list(COLOR_FIXES)}")
        seeds = [s for s, n in zip(seeds, counts) for _ in range(n)]
        fixes = [f for f, n in zip(fixes, counts) for _ in range(n)]
        lr_size = (batch.shape[-1] // opts.upscale, batch.shape[-2] // opts.upscale)
        opts = self.fit_memory(lr_size, opts, batch=batch.shape[0])
        self.last_options = opts
        up = batch.to(self.device)
        del batch
        padded, (h, w) = reflect_pad(up, self.multiple)
        del up
        x = self._sample(padded, opts, seeds)
        out = x[:, :, :h, :w]
        ref = padded[:, :, :h, :w]
        if opts.quantize == "reference":   # the reference's colour fix sees the truncated 8-bit decode
            out = out.mul_(255.0).floor_().div_(255.0)
        if h * w > LARGE_IMAGE_PX:
            for i in range(out.shape[0]):
                color_fix_inplace(out[i:i + 1], ref[i:i + 1], fixes[i])
        else:
            out = torch.cat([color_fix(out[i:i + 1], ref[i:i + 1], fixes[i]) for i in range(out.shape[0])])
        del padded, ref, x
        return _from_batch(out, kinds, counts, opts.quantize)

    # --- internals --------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _velocity_maker(self, opts: UpscaleOptions, cache: bool):
        """`cache`: precompute the semantic keys/values once for all steps (whole image with several steps only:
        a tiler holds every tile's velocity function at once and that memory would grow with the tile count)."""
        model = self.model if self.dtype == torch.float32 else _Float32Out(self.model)
        if opts.mode == "multistep":
            return lambda lq, sem: flow.multistep_velocity_fn(model, lq, sem, opts.guidance, opts.weak_strength,
                                                              cache_semantic=cache)
        return lambda lq, sem: flow.fewstep_velocity_fn(model, lq, sem, cache_semantic=cache)

    def _timesteps(self, opts: UpscaleOptions) -> torch.Tensor:
        # the student's few-step sampler always runs on a linear schedule (docs/method.md s7)
        return flow.timesteps(opts.steps, opts.schedule if opts.mode == "multistep" else "linear")

    def _encode(self, padded01: torch.Tensor, seeds: Sequence[int], rng: str = "vosr", vae_tile: int = 0
                ) -> tuple[torch.Tensor, list[torch.Generator] | None]:
        """Latents, and for rng "reference" each image's generator (the posterior sample drawn, the noise next)."""
        lats, gens = [], []
        kw = {"tile": vae_tile} if vae_tile else {}
        for i, seed in enumerate(seeds):
            first = int(seed) if rng == "reference" else derive_seed(int(seed), "posterior")
            g = torch.Generator(device=self.device).manual_seed(first)
            lats.append(self.autoencoder.encode(padded01[i:i + 1] * 2 - 1, sample=self.sample_posterior,
                                                generator=g, **kw).float())
            gens.append(g)
        return torch.cat(lats), (gens if rng == "reference" else None)

    def _decode(self, z0: torch.Tensor, vae_tile: int = 0) -> torch.Tensor:
        kw = {"tile": vae_tile} if vae_tile else {}
        return torch.cat([self.autoencoder.decode(z0[i:i + 1], **kw).float() for i in range(z0.shape[0])])

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

    def _counted(self, make, batch: int):
        """`make` whose velocity functions report each call to on_progress (one per tile in the call)."""
        tick = self.on_progress
        if tick is None:
            return make

        def counted_make(lq, sem):
            fn = make(lq, sem)
            n = max(1, lq.shape[0] // batch)

            def counted(z, t, t_next):
                v = fn(z, t, t_next)
                tick(n)
                return v
            return counted
        return counted_make

    def _tick(self) -> None:
        if self.on_progress is not None:
            self.on_progress(1)

    def _sample(self, padded: torch.Tensor, opts: UpscaleOptions, seeds: Sequence[int]) -> torch.Tensor:
        """Padded upsampled images in [0, 1] -> padded SR images in [0, 1] (a new tensor)."""
        with self._autocast():
            lq, gens = self._encode(padded, seeds, opts.rng, opts.vae_tile)
            self._tick()
            noise = self._noise(lq, seeds, gens)
            lh, lw = lq.shape[-2:]
            tiled = self._tiled(lh, lw, opts)
            make = self._counted(self._velocity_maker(opts, cache=not tiled and opts.steps > 1), padded.shape[0])
            if tiled:
                grid = tile_grid(lh, lw, opts.tile_size, opts.tile_overlap, self.factor, self.patch)
                sem_tiles = self._tile_tokens(padded, grid, opts.tile_batch)
                velocity = TiledVelocity(make, lq, sem_tiles, grid, opts.tile_batch)
            else:
                velocity = make(lq, self.semantic(padded).float())
            z0 = flow.euler_sample(velocity, noise, self._timesteps(opts))
            del velocity, noise, lq
            x = self._decode(z0, opts.vae_tile)
            self._tick()
        return x.clamp_(-1, 1).add_(1).div_(2).clamp_(0, 1)


# --- image kinds in and out -------------------------------------------------------------------------------------

def _float_to_upsampled(arr: np.ndarray, factor: int) -> torch.Tensor:
    """A float H x W x 3 array in [0, 1] -> [3, H*f, W*f]: PIL bicubic per channel in float ("F" mode), the same
    filter as the 8-bit path without quantising."""
    chans = []
    for c in range(3):
        im = Image.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32), "F")
        if factor != 1:
            im = im.resize((im.width * factor, im.height * factor), Image.BICUBIC)
        chans.append(torch.from_numpy(np.asarray(im, dtype=np.float32).copy()))
    return torch.stack(chans)


def _entry(image: Any, factor: int) -> tuple[torch.Tensor, tuple]:
    """One input -> ([n, 3, H*f, W*f] float32 in [0, 1], kind) where kind says how to give the result back."""
    if isinstance(image, Image.Image):
        return pil_to_batch([bicubic_upsample(image, factor)]), ("pil",)
    if isinstance(image, np.ndarray):
        arr = image[..., None].repeat(3, axis=-1) if image.ndim == 2 else image
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"a numpy image must be H x W, H x W x 3 or H x W x 4, got shape {image.shape}")
        arr = arr[..., :3]
        if arr.dtype == np.uint8:
            pil = Image.fromarray(np.ascontiguousarray(arr), "RGB")
            return pil_to_batch([bicubic_upsample(pil, factor)]), ("numpy", np.uint8, image.ndim)
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"a numpy image must be uint8 or float in [0, 1], got {arr.dtype}")
        return _float_to_upsampled(np.clip(arr, 0, 1), factor)[None], ("numpy", np.float32, image.ndim)
    if isinstance(image, torch.Tensor):
        t = image.detach()
        single = t.ndim == 3
        t = t[None] if single else t
        if t.ndim != 4 or t.shape[1] not in (1, 3):
            raise ValueError(f"a torch image must be [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
        t = t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t
        if t.dtype == torch.uint8:
            pils = [Image.fromarray(a, "RGB") for a in t.permute(0, 2, 3, 1).cpu().numpy()]
            return pil_to_batch([bicubic_upsample(p, factor) for p in pils]), ("torch", torch.uint8, single,
                                                                                image.device)
        arrs = t.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return torch.stack([_float_to_upsampled(a, factor) for a in arrs]), ("torch", torch.float32, single,
                                                                             image.device)
    raise TypeError(f"cannot upscale a {type(image).__name__}: give a PIL image, a numpy array or a torch tensor")


def _to_batch(images: Sequence[Any], factor: int) -> tuple[torch.Tensor, list[tuple], list[int]]:
    parts, kinds, counts = [], [], []
    for im in images:
        t, kind = _entry(im, factor)
        parts.append(t)
        kinds.append(kind)
        counts.append(t.shape[0])
    sizes = {tuple(t.shape[-2:]) for t in parts}
    if len(sizes) != 1:
        found = sorted((w // factor, h // factor) for h, w in sizes)
        raise ValueError(f"upscale_batch needs images of one size, got {found}")
    return (parts[0] if len(parts) == 1 else torch.cat(parts)), kinds, counts


def _to_uint8(x: torch.Tensor, quantize: str = "round") -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3], rounded to nearest (quantize "reference": truncated), in place
    on `x` (float32)."""
    levels = x.clamp_(0, 1).mul_(255.0)
    levels = levels.floor_() if quantize == "reference" else levels.round_()
    return levels.to(torch.uint8).permute(0, 2, 3, 1)


def _from_batch(x: torch.Tensor, kinds: list[tuple], counts: list[int], quantize: str = "round") -> list[Any]:
    out: list[Any] = []
    start = 0
    for kind, n in zip(kinds, counts):
        part = x[start:start + n]
        start += n
        if kind[0] == "pil":
            arr = _to_uint8(part.float(), quantize).cpu().numpy()
            out.append(Image.fromarray(np.ascontiguousarray(arr[0]), "RGB"))
        elif kind[0] == "numpy":
            if kind[1] == np.uint8:
                res = np.ascontiguousarray(_to_uint8(part.float(), quantize).cpu().numpy()[0])
            else:
                res = part[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().copy()
            out.append(res)
        else:
            _, dtype, single, device = kind
            res = (_to_uint8(part.float(), quantize).permute(0, 3, 1, 2).contiguous() if dtype == torch.uint8
                   else part.float().clamp(0, 1).clone())
            res = res.to(device)
            out.append(res[0] if single else res)
    return out
