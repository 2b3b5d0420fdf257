"""The Qwen-Image VAE as a 2D image model, in the released `Qwen-Image-vae-2d` layout (docs/method.md s2).

Qwen-Image's VAE (Wan-style) is published as a causal video VAE. The VOSR authors released an image-only 2D
variant: the same networks with 2D convolutions, used for VOSR-1.4B. This module implements that 2D model so its
folder (config.json with "_class_name": "AutoencoderKLQwenImage2D" + *.safetensors) loads as it is, name for name:

- ChannelRMSNorm: x / ||x||_2 over channels * sqrt(C) * gamma (gamma [C, 1, 1]); no bias.
- ResBlock(in, out): shortcut (1x1 conv when in != out) + conv2(silu(norm2(conv1(silu(norm1(x)))))).
- Attention: one head over all positions, q/k/v from a 1x1 conv to 3C after the norm, a 1x1 output projection,
  residual.
- Encoder: conv_in 3 -> base; per level of dim_mult, num_res_blocks ResBlocks (+ Attention where the scale is in
  attn_scales) then, except on the last level, a stride-2 3x3 conv after zero padding right and bottom by one;
  mid block (ResBlock, Attention, ResBlock); norm, SiLU, conv_out to 2 z_dim (mean and log-variance).
- Decoder: conv_in z_dim -> widest; mid block; per level in reverse, num_res_blocks + 1 ResBlocks then, except on
  the last level, nearest x2 upsampling and a 3x3 conv that halves the width (so the next level starts at half);
  norm, SiLU, conv_out to 3; the output is clamped to [-1, 1].
- quant_conv (1x1, 2 z_dim) after the encoder, post_quant_conv (1x1, z_dim) before the decoder; the posterior is
  diffusers' DiagonalGaussianDistribution.
Latent normalisation with latents_mean / latents_std happens in `Qwen2DVAE` (vosr/encoders/autoencoders.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CLASS_NAME = "AutoencoderKLQwenImage2D"
DEFAULT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]   # Qwen-Image VAE config latents_mean
DEFAULT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
               1.6382, 1.1253, 2.8251, 1.9160]                # ... and latents_std


class ChannelRMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = ChannelRMSNorm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = ChannelRMSNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.silu(self.norm1(x)))
        y = self.conv2(F.silu(self.norm2(y)))
        return y + self.conv_shortcut(x)


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).contiguous()
        q, k, v = qkv.unbind(1)   # [b, hw, c] each; contiguous as the authors' model, so SDPA sums alike
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, c, h, w)) + x


class Resample(nn.Module):
    """`down`: zero-pad right/bottom by 1, 3x3 conv stride 2; `up`: nearest x2, 3x3 conv to half the width."""

    def __init__(self, dim: int, up: bool):
        super().__init__()
        if up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(dim, dim), ResBlock(dim, dim)])
        self.attentions = nn.ModuleList([Attention(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, base: int, out_ch: int, dim_mult: list[int], num_res_blocks: int, attn_scales: list[float]):
        super().__init__()
        widths = [base * m for m in [1, *dim_mult]]
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        scale = 1.0
        for level, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(cin, cout))
                if scale in attn_scales:
                    layers.append(Attention(cout))
                cin = cout
            if level < len(dim_mult) - 1:
                layers.append(Resample(cout, up=False))
                scale /= 2.0
        self.down_blocks = nn.ModuleList(layers)
        self.mid_block = MidBlock(widths[-1])
        self.norm_out = ChannelRMSNorm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for layer in self.down_blocks:
            x = layer(x)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(cin if i == 0 else cout, cout) for i in range(num_res_blocks + 1)])
        self.upsamplers = nn.ModuleList([Resample(cout, up=True)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Decoder(nn.Module):
    def __init__(self, base: int, z_dim: int, dim_mult: list[int], num_res_blocks: int):
        super().__init__()
        widths = [base * m for m in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv_in = nn.Conv2d(z_dim, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0])
        levels = []
        for level, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            levels.append(UpLevel(cin // 2 if level else cin, cout, num_res_blocks, level < len(dim_mult) - 1))
        self.up_blocks = nn.ModuleList(levels)
        self.norm_out = ChannelRMSNorm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class QwenImageVAE2D(nn.Module):
    """encode(x [B, 3, H, W] in [-1, 1]) -> posterior; decode(z [B, z_dim, H/8, W/8]) -> image in [-1, 1]."""

    def __init__(self, base_dim: int = 96, z_dim: int = 16, dim_mult: list[int] | None = None, num_res_blocks: int = 2,
                 attn_scales: list[float] | None = None, latents_mean: list[float] | None = None,
                 latents_std: list[float] | None = None, **_ignored: Any):
        super().__init__()
        dim_mult = list(dim_mult or [1, 2, 4, 4])
        self.config = SimpleNamespace(base_dim=base_dim, z_dim=z_dim, dim_mult=dim_mult,
                                      num_res_blocks=num_res_blocks, attn_scales=list(attn_scales or []),
                                      latents_mean=list(latents_mean or DEFAULT_MEAN),
                                      latents_std=list(latents_std or DEFAULT_STD))
        self.spatial_compression_ratio = 2 ** (len(dim_mult) - 1)
        self.encoder = Encoder(base_dim, 2 * z_dim, dim_mult, num_res_blocks, self.config.attn_scales)
        self.quant_conv = nn.Conv2d(2 * z_dim, 2 * z_dim, 1)
        self.post_quant_conv = nn.Conv2d(z_dim, z_dim, 1)
        self.decoder = Decoder(base_dim, z_dim, dim_mult, num_res_blocks)

    def encode(self, x: torch.Tensor):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0)


def is_2d_folder(folder: str | Path) -> bool:
    """A folder whose config.json names the released 2D class."""
    cfg = Path(folder) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("_class_name") == CLASS_NAME
    except (OSError, ValueError):
        return False


def load_qwen2d(folder: str | Path) -> QwenImageVAE2D:
    """The 2D VAE of a `Qwen-Image-vae-2d` folder, float32, eval mode, weights loaded strictly."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    vae = QwenImageVAE2D(**{k: v for k, v in config.items() if not k.startswith("_")})
    files = sorted(folder.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device="cpu"))
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{folder}: weights do not fit the 2D Qwen-Image VAE its config.json describes: "
                         f"{str(exc)[:400]}") from exc
    return vae.float().eval().requires_grad_(False)


__all__ = ["CLASS_NAME", "QwenImageVAE2D", "is_2d_folder", "load_qwen2d"]
