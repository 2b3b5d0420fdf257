"""Building blocks of the VOSR DiT (docs/method.md s4): norms, time embedding, SwiGLU, self- and cross-attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnable gain, computed in float32 (docs/method.md s4: eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT sinusoid of the RAW time t in [0, 1] (docs/method.md s4: no x1000), cos half first, then sin."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid (dim 256, max period 1e4) -> Linear -> SiLU -> Linear (docs/method.md s4)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_sinusoid(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class SwiGLU(nn.Module):
    """w12: D -> 2h, silu(x1) * x2, w3: h -> D, with biases (docs/method.md s4)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class SelfAttention(nn.Module):
    """Multi-head self-attention: qkv with bias, RMSNorm QK-norm, 2D RoPE on q and k after the norm, SDPA."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Image tokens attend to projected semantic tokens: separate q/k/v/proj with bias, RMSNorm QK-norm, no RoPE,
    no norm, gate or modulation around it (docs/method.md s4)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised keys and values of the semantic tokens (they depend on neither z_t nor t)."""
        return self.k_norm(self._heads(self.k(ctx))), self._heads(self.v(ctx))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`ctx`: projected tokens [B, M, D], or their precomputed (keys, values) from `keys_values`."""
        b, n, d = x.shape
        q = self.q_norm(self._heads(self.q(x)))
        k, v = ctx if isinstance(ctx, tuple) else self.keys_values(ctx)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SemanticProjection(nn.Module):
    """LayerNorm(enc_dim, eps 1e-5, affine) then MLP enc_dim -> ratio*D -> D with GELU(tanh) (docs/method.md s3).

    Zeroed raw tokens become LN.bias -> one learned constant "null" token."""

    def __init__(self, enc_dim: int, hidden_size: int, ratio: int = 3):
        super().__init__()
        self.norm = nn.LayerNorm(enc_dim, eps=1e-5, elementwise_affine=True)
        self.fc1 = nn.Linear(enc_dim, ratio * hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(ratio * hidden_size, hidden_size)

    def forward(self, sem: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(sem))))
