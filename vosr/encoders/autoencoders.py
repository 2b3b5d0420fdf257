"""Latent autoencoders (docs/method.md s2): the SD2.1 VAE (optionally decoding with the authors' light decoder), the
Qwen-Image VAE (the released 2D model, or diffusers' video VAE on single frames), and a pixel codec.

Every codec maps images in [-1, 1] [B, 3, H, W] to *scaled* latents [B, C, H/f, W/f] (the tensors the DiT sees)
and back. H and W must be multiples of f: padding to that multiple is the caller's job (docs/method.md s0 - the
upscaler pads with reflection and crops back); other sizes are refused with a clear error.
Weights are read from local folders, or from hf:// URIs through the Hugging Face cache (vosr/hub.py).
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from ..hub import localize
from .specs import autoencoder_spec, lookup
from .weights import MissingWeightsError, files_sha256, find_diffusers_folder, offline

NO_LIGHT_DECODER = "none"  # autoencoder.light_decoder value that forces the full decoder

SD21_SCALE = 0.18215  # docs/method.md s2: latent = sample * 0.18215, no shift
PIXEL_SCALE = 2.0  # pixel codec: [-1, 1] pixels (std ~0.5 on photos) times 2 -> unit-ish latents; exact in fp32


def _check_image(x: torch.Tensor, f: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}.encode expects images [B, 3, H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % f or w % f:
        raise ValueError(f"{name}.encode: image size {h}x{w} is not a multiple of the autoencoder factor {f}; "
                         f"pad to a multiple of {f} first (reflect) and crop the output back (docs/method.md s0)")


def _check_latent(z: torch.Tensor, c: int, name: str) -> None:
    if z.ndim != 4 or z.shape[1] != c:
        raise ValueError(f"{name}.decode expects latents [B, {c}, h, w], got shape {tuple(z.shape)}")


class PixelCodec:
    """Weight-free space-to-depth codec: each f x f pixel block becomes 3 f^2 channels, times PIXEL_SCALE.

    decode(encode(x)) == x bit for bit for x in [-1, 1] (scaling by a power of two is exact). `sample` and
    `generator` are accepted for interface parity and ignored: the codec is deterministic.
    """

    name = "pixel"
    sample_default = False  # deterministic: no posterior to sample

    def __init__(self, downsample: int, device: str | torch.device = "cpu"):
        self.downsample = int(downsample)
        self.latent_channels = 3 * self.downsample ** 2
        self.device = torch.device(device)
        self.codec = f"pixel-s2d-f{self.downsample}-x{PIXEL_SCALE:g}"

    # bytes of working memory per pixel of a tile beyond input and output (vosr.memory): none, it is a reshape
    work_bytes_per_px = {"encode": 0, "decode": 0}

    def encode(self, x: torch.Tensor, sample: bool | None = None, generator: torch.Generator | None = None,
               tile: int = 0):
        """`tile` is accepted for interface parity: a reshape needs no tiling (and tiling would not change it)."""
        _check_image(x, self.downsample, self.name)
        return F.pixel_unshuffle(x.to(self.device, torch.float32), self.downsample) * PIXEL_SCALE

    def decode(self, z: torch.Tensor, tile: int = 0) -> torch.Tensor:
        _check_latent(z, self.latent_channels, self.name)
        x = F.pixel_shuffle(z.to(self.device, torch.float32) / PIXEL_SCALE, self.downsample)
        return x.clamp(-1.0, 1.0)

    def parameter_bytes(self) -> int:
        return 0

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "weights_sha256": hashlib.sha256(self.codec.encode()).hexdigest(),
                "codec": self.codec, "scaling": f"latent = pixel_unshuffle(x, {self.downsample}) * {PIXEL_SCALE:g}",
                "latent_channels": self.latent_channels, "downsample": self.downsample}


class _DiffusersVAE:
    """Common part of the two diffusers VAEs: frozen fp32 module, posterior sample or mode, clamped decode."""

    name = ""
    latent_channels = 0
    downsample = 8

    def __init__(self, vae: torch.nn.Module, folder, sample_default: bool, device):
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval().requires_grad_(False)  # loaded as fp32 (docs/method.md s2)
        self.folder = folder
        self.sample_default = bool(sample_default)
        self.weights_sha256 = files_sha256(sorted(folder.glob("*.safetensors")), folder)

    # Working memory per pixel of a tile beyond its input and output (vosr.memory): float32 activations at full
    # resolution, the first block's channels while encoding and the last upsampler's (the second width) while
    # decoding, times the tensors a ResNet block keeps alive at once (WORK_TENSORS). For the SD2.1 VAE (128, 256,
    # 512, 512) that is 2.6 KB per pixel to encode and 4.6 KB to decode; measured peaks stay below
    # (benchmarks/bench_upscale_memory.py prints both).
    WORK_TENSORS = {"encode": 5, "decode": 4.5}

    @property
    def work_bytes_per_px(self) -> dict[str, int]:
        cfg = self.vae.config
        widths = list(getattr(cfg, "block_out_channels", None) or
                      [getattr(cfg, "base_dim", 96) * m for m in getattr(cfg, "dim_mult", (1, 2, 4, 4))])
        first, second = widths[0], widths[1] if len(widths) > 1 else widths[0]
        return {"encode": int(4 * self.WORK_TENSORS["encode"] * first),
                "decode": int(4 * self.WORK_TENSORS["decode"] * second)}

    def _posterior(self, x: torch.Tensor):
        raise NotImplementedError

    def _moments(self, x01: torch.Tensor) -> torch.Tensor:
        """Posterior parameters (mean and log-variance stacked on channels) [B, 2C, h, w] of images in [-1, 1]."""
        p = self._posterior(x01.to(self.device, torch.float32)).parameters
        return p.squeeze(2) if p.ndim == 5 else p

    def _draw(self, x: torch.Tensor, sample: bool | None, generator: torch.Generator | None,
              tile: int = 0) -> torch.Tensor:
        """Posterior sample (or mode) [B, C, h, w]; with `tile` > 0 and a larger image, the moments are computed
        tile by tile and blended (vosr.encoders.tiled), then sampled once for the whole latent."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        from .tiled import moments_tiled

        _check_image(x, self.downsample, self.name)
        sample = self.sample_default if sample is None else bool(sample)
        with torch.no_grad():
            if tile and max(x.shape[-2:]) > tile:
                moments = moments_tiled(self._moments, x, tile, self.downsample, 2 * self.latent_channels)
            else:
                moments = self._moments(x)
            post = DiagonalGaussianDistribution(moments)
            return post.sample(generator=generator) if sample else post.mode()

    def _decode_tiles(self, z: torch.Tensor, tile: int, whole) -> torch.Tensor:
        from .tiled import decode_tiled

        if tile and max(z.shape[-2:]) * self.downsample > tile:
            return decode_tiled(whole, z, tile, self.downsample)
        return whole(z)

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.vae.parameters())


class SD21VAE(_DiffusersVAE):
    """SD2.1 VAE (diffusers AutoencoderKL): latent = posterior sample (or mode) * 0.18215 (docs/method.md s2).

    `light`: (decoder, file, sha256) of the authors' light decoder (vosr/encoders/light_decoder.py); decode then
    runs it on latent / 0.18215 (no post_quant_conv) instead of the VAE's own decoder."""

    name = "sd21"
    latent_channels = 4

    def __init__(self, vae, folder, sample_default: bool, device, light=None):
        super().__init__(vae, folder, sample_default, device)
        self.light = None
        if light is not None:
            self.light = light[0].to(self.device).eval().requires_grad_(False)
            self.light_file, self.light_sha256 = str(light[1]), light[2]
        cfg_scale = getattr(vae.config, "scaling_factor", SD21_SCALE)
        if abs(float(cfg_scale) - SD21_SCALE) > 1e-6:
            warnings.warn(f"sd21 VAE at {folder} declares scaling_factor {cfg_scale}; VOSR uses {SD21_SCALE} "
                          "(docs/method.md s2)", stacklevel=3)
        if vae.config.latent_channels != self.latent_channels:
            raise ValueError(f"sd21 VAE at {folder} has {vae.config.latent_channels} latent channels, expected 4")
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        if self.downsample != 8:
            warnings.warn(f"sd21 VAE at {folder} has spatial factor {self.downsample}, the SD2.1 VAE has 8",
                          stacklevel=3)

    def _posterior(self, x):
        return self.vae.encode(x).latent_dist

    def encode(self, x: torch.Tensor, sample: bool | None = None, generator: torch.Generator | None = None,
               tile: int = 0):
        return self._draw(x, sample, generator, tile) * SD21_SCALE

    def decode(self, z: torch.Tensor, tile: int = 0) -> torch.Tensor:
        """Pixels in [-1, 1]; with `tile` > 0 and a larger image, decoded tile by tile (vosr.encoders.tiled)."""
        _check_latent(z, self.latent_channels, self.name)

        def whole(zt: torch.Tensor) -> torch.Tensor:
            u = zt.to(self.device, torch.float32) / SD21_SCALE
            return self.light(u) if self.light is not None else self.vae.decode(u).sample

        with torch.no_grad():
            x = self._decode_tiles(z, tile, whole)
        return x.clamp_(-1.0, 1.0)

    def identity(self) -> dict[str, Any]:
        out = {"name": self.name, "weights_sha256": self.weights_sha256,
               "scaling": f"latent = posterior * {SD21_SCALE}", "latent_channels": self.latent_channels,
               "downsample": self.downsample, "decoder": "vae"}
        if self.light is not None:
            out.update(decoder="light", light_decoder=self.light_file, light_decoder_sha256=self.light_sha256)
        return out


class Qwen2DVAE(_DiffusersVAE):
    """Qwen-Image VAE, per-channel normalised latents: the authors' 2D image model (vosr/encoders/qwen2d.py, a
    `Qwen-Image-vae-2d` folder) or diffusers' AutoencoderKLQwenImage on single frames (a Qwen/Qwen-Image `vae`
    folder).

    z = (sample - mean_c) / std_c with the 16 latents_mean / latents_std of the model config (docs/method.md s2);
    decode runs the full decoder on z * std + mean and clamps to [-1, 1]. For the video VAE the temporal axis (one
    frame) is added before it and removed after it.
    """

    name = "qwen2d"
    latent_channels = 16

    def __init__(self, vae, folder, sample_default: bool, device):
        super().__init__(vae, folder, sample_default, device)
        from .qwen2d import QwenImageVAE2D

        self.frames = not isinstance(vae, QwenImageVAE2D)   # the video VAE takes [B, C, T, H, W]
        cfg = vae.config
        if cfg.z_dim != self.latent_channels:
            raise ValueError(f"qwen2d VAE at {folder} has z_dim {cfg.z_dim}, expected 16")
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError(f"qwen2d VAE at {folder}: latents_mean/latents_std must have {cfg.z_dim} entries")
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        # the authors' arithmetic: multiply by 1/std on encode, divide by it on decode (same values, same rounding)
        self.inv_std = 1.0 / torch.tensor(cfg.latents_std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.downsample = int(vae.spatial_compression_ratio)
        if self.downsample != 8:
            warnings.warn(f"qwen2d VAE at {folder} has spatial factor {self.downsample}, Qwen-Image has 8",
                          stacklevel=3)

    def _posterior(self, x):
        return self.vae.encode(x.unsqueeze(2)).latent_dist if self.frames else self.vae.encode(x)

    def encode(self, x: torch.Tensor, sample: bool | None = None, generator: torch.Generator | None = None,
               tile: int = 0):
        s = self._draw(x, sample, generator, tile)      # [B, C, h, w]: _moments drops the temporal axis
        return (s - self.mean) * self.inv_std

    def decode(self, z: torch.Tensor, tile: int = 0) -> torch.Tensor:
        _check_latent(z, self.latent_channels, self.name)

        def whole(zt: torch.Tensor) -> torch.Tensor:
            raw = zt.to(self.device, torch.float32) / self.inv_std + self.mean
            return self.vae.decode(raw.unsqueeze(2)).sample.squeeze(2) if self.frames else self.vae.decode(raw)

        with torch.no_grad():
            x = self._decode_tiles(z, tile, whole)
        return x.clamp_(-1.0, 1.0)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "weights_sha256": self.weights_sha256,
                "scaling": "latent = (posterior - latents_mean[c]) / latents_std[c]",
                "latents_mean": [float(v) for v in self.mean.flatten()],
                "latents_std": [float(v) for v in self.std.flatten()],
                "latent_channels": self.latent_channels, "downsample": self.downsample,
                "layout": "video VAE, one frame" if self.frames else "2D (Qwen-Image-vae-2d)"}


_SD21_HOW = ("Provide a local copy of the Hugging Face folder stabilityai/stable-diffusion-2-1/vae (config.json + "
             "diffusion_pytorch_model.safetensors), e.g. fetched beforehand with `huggingface-cli download "
             "stabilityai/stable-diffusion-2-1 --include 'vae/*' --local-dir DIR`, and set autoencoder.path=DIR "
             "(the folder itself or its parent holding vae/), or name the released copy as "
             "autoencoder.path=hf://CSWRY/VOSR/stable-diffusion-2-1-base. Nothing else is downloaded by VOSR.")
_QWEN_HOW = ("Provide a local copy of the authors' 2D model (Hugging Face CSWRY/VOSR, folder Qwen-Image-vae-2d) or "
             "of the Hugging Face folder Qwen/Qwen-Image/vae (config.json + diffusion_pytorch_model.safetensors), "
             "fetched beforehand, and set autoencoder.path=DIR (the folder itself or its parent holding vae/), or "
             "name it as autoencoder.path=hf://CSWRY/VOSR/Qwen-Image-vae-2d. Nothing else is downloaded by VOSR.")


def _build_pixel(ae_cfg, device):
    return PixelCodec(ae_cfg.downsample, device)


def _build_sd21(ae_cfg, device):
    from diffusers import AutoencoderKL

    folder = find_diffusers_folder(localize(ae_cfg.path), "sd21 VAE", _SD21_HOW)
    light = None
    if ae_cfg.light_decoder and ae_cfg.light_decoder != NO_LIGHT_DECODER:
        from .light_decoder import load_light_decoder

        path = localize(ae_cfg.light_decoder)
        module, _, sha = load_light_decoder(path)
        light = (module, path, sha)
    with offline():
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                            torch_dtype=torch.float32, low_cpu_mem_usage=False)
    return SD21VAE(vae, folder, ae_cfg.sample_posterior, device, light=light)


def _build_qwen2d(ae_cfg, device):
    from diffusers import AutoencoderKLQwenImage

    from .qwen2d import is_2d_folder, load_qwen2d

    folder = find_diffusers_folder(localize(ae_cfg.path), "qwen2d VAE", _QWEN_HOW)
    if is_2d_folder(folder):
        return Qwen2DVAE(load_qwen2d(folder), folder, ae_cfg.sample_posterior, device)
    with offline():
        vae = AutoencoderKLQwenImage.from_pretrained(str(folder), local_files_only=True,
                                                     use_safetensors=True, torch_dtype=torch.float32, low_cpu_mem_usage=False)
    return Qwen2DVAE(vae, folder, ae_cfg.sample_posterior, device)


AUTOENCODERS = {"pixel": _build_pixel, "sd21": _build_sd21, "qwen2d": _build_qwen2d}


def build_autoencoder(ae_cfg, device: str | torch.device = "cpu"):
    """Build the configured autoencoder from local weights (see the module docstring for the interface)."""
    builder = lookup(AUTOENCODERS, "autoencoder", ae_cfg.name)
    codec = builder(ae_cfg, device)
    spec = autoencoder_spec(ae_cfg)
    if codec.latent_channels != spec.latent_channels:
        raise ValueError(f"{ae_cfg.name}: built codec has {codec.latent_channels} latent channels but the static "
                         f"spec says {spec.latent_channels}")
    return codec


__all__ = ["AUTOENCODERS", "MissingWeightsError", "PixelCodec", "Qwen2DVAE", "SD21VAE", "build_autoencoder"]
