"""The VOSR diffusion transformer (docs/method.md s4): a LightningDiT-style backbone with PixArt adaLN-single.

Input cat(lq latent, z_t) (LR first) -> p=2 patch conv -> depth x [adaLN self-attn with 2D RoPE, raw cross-attn to
the projected semantic tokens, adaLN SwiGLU] -> RMSNorm + adaLN(c) final layer -> unpatchify. The student adds a
second time embedder on the target time r, scaled by the gap (t - r), so it equals the teacher on r = t.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import (
    CrossAttention,
    RMSNorm,
    SelfAttention,
    SemanticProjection,
    SwiGLU,
    TimestepEmbedder,
    modulate,
)
from .rope import rope_tables


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width int(2/3 * ratio * D) = int(8D/3) at ratio 4 (docs/method.md s4: 2730 / 4096)."""
    return int(2 / 3 * mlp_ratio * hidden_size)


class DiTBlock(nn.Module):
    """One block: x += g_msa*SelfAttn(mod(norm x)); x += CrossAttn(x, sem); x += g_mlp*SwiGLU(mod(norm x))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qk_norm: bool = True):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = SelfAttention(dim, num_heads, qk_norm)
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)
        # adaLN-single: per-block learned table added to the shared t_block output (PixArt), N(0,1)/sqrt(D)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, c0: torch.Tensor, ctx,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, _, d = x.shape
        # The modulation table, gates and the residual stream stay float32 under bf16 autocast: in the reference
        # the fp32 table promotes the autocast (bf16) t_block output, so `x + gate * f(x)` is float32 in every
        # block (docs/method.md s5: bf16 autocast with fp32 master weights). Inputs of the sub-layers are cast to their
        # weight dtype, a no-op under autocast (fp32 weights; autocast then runs the matmuls in bf16) and what
        # keeps a model whose weights were cast to bf16 (no autocast) working.
        mods = self.scale_shift_table[None].float() + c0.view(b, 6, d).float()
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)
        x = x.float()
        wdt = self.attn.qkv.weight.dtype
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa).to(wdt), rope)
        x = x + self.cross_attn(x.to(wdt), ctx)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp).to(wdt))
        return x


class FinalLayer(nn.Module):
    """RMSNorm, modulation by (shift, scale) = Linear(SiLU(c)) D -> 2D, then Linear D -> p*p*C."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale).to(self.linear.weight.dtype))


class SemanticContext:
    """Projected semantic tokens with every block's cross-attention keys/values, computed once.

    They depend only on the raw tokens, not on z_t, t or r, so a sampler can reuse them at every step (exactly the
    same numbers as recomputing them). Build with `VOSRDiT.prepare_semantic(sem)`; pass in place of `sem`."""

    def __init__(self, raw_shape: tuple[int, ...], kv: list[tuple[torch.Tensor, torch.Tensor]]):
        self.shape = raw_shape
        self.kv = kv

    @property
    def batch(self) -> int:
        return self.shape[0]


class VOSRDiT(nn.Module):
    """forward(z_t [B,C,h,w], t [B], lq [B,C,h,w], sem [B,N,Dsem] raw tokens, r [B] | None) -> velocity."""

    def __init__(self, *, latent_channels: int, sem_dim: int, hidden_size: int, depth: int, num_heads: int,
                 patch_size: int = 2, mlp_ratio: float = 4.0, encdim_ratio: int = 3, time_freq_dim: int = 256,
                 rope_theta: float = 10000.0, qk_norm: bool = True, train_grid: int = 32, student: bool = False,
                 rope_arithmetic: str = "float64"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.latent_channels = latent_channels
        self.sem_dim = sem_dim
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.patch_size = patch_size
        self.rope_theta = rope_theta
        self.rope_arithmetic = rope_arithmetic  # "float64" or the released models' "float32" (model/rope.py)
        self.is_student = student
        self.train_grid = int(train_grid)
        self.mlp_hidden = swiglu_hidden(hidden_size, mlp_ratio)
        # Activation checkpointing: 0 = off, k = recompute blocks 0, k, 2k, ... in backward (vosr/model/execution.py)
        self.checkpoint_every = 0
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

        # LR latent first, then z_t: in 2C channels, out C (docs/method.md s4 / s10.1)
        self.x_embedder = nn.Conv2d(2 * latent_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, time_freq_dim)
        self.r_embedder = TimestepEmbedder(hidden_size, time_freq_dim) if student else None
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))  # shared by all blocks
        self.sem_proj = SemanticProjection(sem_dim, hidden_size, encdim_ratio)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, self.mlp_hidden, qk_norm) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, latent_channels)
        self.initialize_weights()

    # --- initialisation (docs/method.md s4) ----------------------------------------------------------------------
    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for emb in (self.t_embedder, self.r_embedder):
            if emb is not None:
                self.init_time_embedder(emb)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @staticmethod
    def init_time_embedder(emb: TimestepEmbedder) -> None:
        for layer in (emb.mlp[0], emb.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    # --- positions ------------------------------------------------------------------------------------------
    def set_train_grid(self, grid: int) -> None:
        """Change the training token grid (e.g. the 256 -> 512 progressive stage); RoPE is rebuilt from it."""
        self.train_grid = int(grid)
        self._rope_cache.clear()

    def rope(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (h, w, self.train_grid, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(h, w, self.head_dim, (self.train_grid, self.train_grid),
                                                self.rope_theta, device, self.rope_arithmetic)
        return self._rope_cache[key]

    # --- forward --------------------------------------------------------------------------------------------
    def prepare_semantic(self, sem: torch.Tensor) -> SemanticContext:
        """Project raw tokens once (LN + MLP) and precompute each block's cross-attention keys/values."""
        self._check_sem(sem, sem.shape[0] if sem.ndim == 3 else -1)
        ctx = self.sem_proj(sem.to(self.sem_proj.fc1.weight.dtype))
        return SemanticContext(tuple(sem.shape), [blk.cross_attn.keys_values(ctx) for blk in self.blocks])

    def _check_sem(self, sem: torch.Tensor, b: int) -> None:
        if sem.ndim != 3 or sem.shape[0] != b or sem.shape[-1] != self.sem_dim:
            raise ValueError(f"semantic tokens must be [{b}, N, {self.sem_dim}], got {tuple(sem.shape)}")

    def condition(self, t: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """c = emb_t(t) (+ emb_r(r) * (t - r) for the student, docs/method.md s4)."""
        c = self.t_embedder(t)
        if self.r_embedder is not None:
            if r is None:
                r = t
            c = c + self.r_embedder(r) * (t.float() - r.float()).to(c.dtype)[:, None]
        elif r is not None:
            raise ValueError("this model is a teacher (no r_embedder); pass r=None or build it with student=True")
        return c

    def unpatchify(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """[B, gh*gw, p*p*C] with per-token channel order (p, q, c) -> [B, C, gh*p, gw*p]."""
        p, c = self.patch_size, self.latent_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    @staticmethod
    def _batch_time(t: Any, b: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"time must be a scalar or shape [{b}], got {tuple(t.shape)}")
        return t.float()

    def forward(self, z_t: torch.Tensor, t: Any, lq: torch.Tensor, sem: torch.Tensor | SemanticContext,
                r: Any = None) -> torch.Tensor:
        if z_t.ndim != 4 or z_t.shape != lq.shape:
            raise ValueError(f"z_t {tuple(z_t.shape)} and lq {tuple(lq.shape)} must both be [B, C, h, w]")
        b, c, h, w = z_t.shape
        if c != self.latent_channels:
            raise ValueError(f"expected {self.latent_channels} latent channels, got {c}")
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {p}; pad the input "
                             "(the upscaler reflect-pads to the latent/patch multiple)")
        if isinstance(sem, SemanticContext):
            if sem.batch != b:
                raise ValueError(f"semantic context was prepared for batch {sem.batch}, got batch {b}")
        else:
            self._check_sem(sem, b)
        t = self._batch_time(t, b, z_t.device)
        r = None if r is None else self._batch_time(r, b, z_t.device)
        gh, gw = h // p, w // p

        x = self.x_embedder(torch.cat([lq, z_t], dim=1)).flatten(2).transpose(1, 2)
        c_emb = self.condition(t, r)
        c0 = self.t_block(c_emb)
        if isinstance(sem, SemanticContext):
            ctxs = sem.kv
        else:
            ctx = self.sem_proj(sem.to(self.sem_proj.fc1.weight.dtype))  # once per forward, shared by all blocks
            ctxs = [ctx] * len(self.blocks)
        rope = self.rope(gh, gw, x.device)
        recompute = self.checkpoint_every > 0 and torch.is_grad_enabled()
        for i, (block, ctx_b) in enumerate(zip(self.blocks, ctxs)):
            if recompute and i % self.checkpoint_every == 0:
                # keeps only the block's inputs; its activations are recomputed in backward (same numbers)
                x = checkpoint(block, x, c0, ctx_b, rope, use_reentrant=False)
            else:
                x = block(x, c0, ctx_b, rope)
        x = self.final_layer(x, c_emb)
        return self.unpatchify(x, gh, gw)


def model_dims(cfg) -> dict[str, Any]:
    """Everything build_dit needs, from the resolved config (latent/semantic shapes from vosr.encoders)."""
    from vosr.encoders import autoencoder_spec, semantic_spec

    ae = autoencoder_spec(cfg.autoencoder)
    sem = semantic_spec(cfg.semantic)
    m = cfg.model
    denom = ae.downsample * m.patch_size
    if cfg.data.resolution % denom:
        raise ValueError(f"data.resolution {cfg.data.resolution} must be a multiple of downsample x patch "
                         f"({ae.downsample} x {m.patch_size})")
    return {
        "latent_channels": ae.latent_channels,
        "sem_dim": sem.dim,
        "sem_tokens": sem.num_tokens,
        "downsample": ae.downsample,
        "hidden_size": m.hidden_size,
        "depth": m.depth,
        "num_heads": m.num_heads,
        "patch_size": m.patch_size,
        "mlp_ratio": m.mlp_ratio,
        "encdim_ratio": m.encdim_ratio,
        "time_freq_dim": m.time_freq_dim,
        "rope_theta": m.rope_theta,
        "qk_norm": m.qk_norm,
        "rope_arithmetic": m.rope_arithmetic,
        "train_grid": cfg.data.resolution // denom,  # G = resolution / (downsample * patch)
    }


def build_dit(cfg, student: bool = False, device: torch.device | str | None = None,
              train_grid: int | None = None) -> VOSRDiT:
    """The configured DiT (teacher, or student with the r-embedder). device="meta" builds without memory."""
    dims = model_dims(cfg)
    kwargs = {k: dims[k] for k in ("latent_channels", "sem_dim", "hidden_size", "depth", "num_heads",
                                   "patch_size", "mlp_ratio", "encdim_ratio", "time_freq_dim", "rope_theta",
                                   "qk_norm", "train_grid", "rope_arithmetic")}
    if train_grid is not None:
        kwargs["train_grid"] = int(train_grid)
    if device is None:
        return VOSRDiT(student=student, **kwargs)
    with torch.device(device):
        return VOSRDiT(student=student, **kwargs)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(cfg) -> dict[str, Any]:
    """Parameter counts on the meta device (instant for the real presets), JSON-able.

    docs/method.md s4 table: vosr-0.5b 485.6M (+1.31M student), vosr-1.4b 1,393.9M (+2.76M)."""
    teacher = build_dit(cfg, student=False, device="meta")
    student = build_dit(cfg, student=True, device="meta")
    dims = model_dims(cfg)
    n_t, n_s = _numel(teacher), _numel(student)
    return {
        "preset": cfg.preset,
        "dit_params": n_t,
        "dit_params_millions": round(n_t / 1e6, 2),
        "student_extra_params": n_s - n_t,
        "student_extra_params_millions": round((n_s - n_t) / 1e6, 3),
        "student_params": n_s,
        "params_per_block": _numel(teacher.blocks[0]),
        "mlp_hidden": teacher.mlp_hidden,
        "head_dim": teacher.head_dim,
        **{k: dims[k] for k in ("hidden_size", "depth", "num_heads", "patch_size", "latent_channels", "sem_dim",
                                "sem_tokens", "train_grid")},
    }
