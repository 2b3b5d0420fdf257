"""Configuration sections of the method library: backbone, encoders, flow matching, distillation, degradation.

Constants cite METHOD.md (shared design notes, read against the reference code) or the paper (VOSR, arXiv).
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import ConfigError, option


@dataclass
class ModelConfig:
    hidden_size: int = option(96, "DiT width D (METHOD.md s4: 1024 for 0.5B, 1536 for 1.4B).", ge=8)
    depth: int = option(4, "Number of DiT blocks (28 for 0.5B, 36 for 1.4B).", ge=1)
    num_heads: int = option(4, "Attention heads; head_dim = D / heads (64 in both real presets).", ge=1)
    patch_size: int = option(2, "Patch size over the latent grid (paper A.3: 2).", ge=1)
    mlp_ratio: float = option(4.0, "MLP ratio; the SwiGLU hidden width is int(2/3 * ratio * D) = int(8D/3) at 4.",
                              gt=0)
    encdim_ratio: int = option(3, "Hidden ratio of the semantic-token projection MLP (METHOD.md s3: 3).", ge=1)
    time_freq_dim: int = option(256, "Sinusoid size of the time embedding (DiT: 256).", ge=8)
    rope_theta: float = option(10000.0, "RoPE base frequency (METHOD.md s4: 10000).", gt=0)
    qk_norm: bool = option(True, "RMSNorm on queries and keys in self- and cross-attention (METHOD.md s4).")

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                              f"({self.num_heads})")
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 4:
            raise ConfigError(f"model head_dim {head_dim} must be divisible by 4 for 2D RoPE on half the head "
                              "dim per axis")


@dataclass
class AutoencoderConfig:
    name: str = option("pixel", "Autoencoder registry name: pixel (weight-free space-to-depth codec), sd21 "
                       "(SD2.1 VAE, 4 channels), qwen2d (Qwen-Image VAE on single frames, 16 channels).",
                       choices=["pixel", "sd21", "qwen2d"])
    path: str = option("", "Local folder with the VAE weights (diffusers layout). Unused by pixel.")
    downsample: int = option(4, "Spatial factor of the pixel codec (sd21 and qwen2d are fixed at 8).", ge=1)
    sample_posterior: bool = option(True, "Encode with a posterior sample (reference behaviour) instead of the mode.")
    inference_sample_posterior: bool = option(True, "Posterior sample at inference too (METHOD.md s0: mode is an "
                                              "option; the default follows the reference).")


@dataclass
class SemanticConfig:
    name: str = option("tiny_vit", "Semantic encoder registry name: tiny_vit (small ViT, fixed-seed random weights; "
                       "carries no semantics), dinov2_vitb14, dinov2_vitl14.",
                       choices=["tiny_vit", "dinov2_vitb14", "dinov2_vitl14"])
    path: str = option("", "Local weights file (.pth or .safetensors) for DINOv2; nothing is downloaded.")
    layer: int = option(2, "Block whose output is used, 0-based, CLS removed, no final norm (METHOD.md s3: 8 for "
                        "ViT-B/14, 17 for ViT-L/14).", ge=0)
    input_size: int = option(64, "Square input size the upsampled LR is bicubic-resized to (448 for DINOv2 -> "
                             "32x32 tokens).", ge=14)
    allow_random: bool = option(False, "Let a real preset run with randomly initialised semantic weights "
                                "(only for tests and benchmarks; the result carries no semantics).")
    width: int = option(64, "tiny_vit only: token width.", ge=8)
    depth: int = option(3, "tiny_vit only: number of blocks.", ge=1)
    num_heads: int = option(4, "tiny_vit only: attention heads.", ge=1)
    patch_size: int = option(8, "tiny_vit only: patch size in pixels.", ge=1)
    seed: int = option(1234, "tiny_vit only: seed of its fixed random weights.")


@dataclass
class FlowConfig:
    cfg_ratio: float = option(0.1, "Probability per sample of the partial (weak) branch in training (METHOD.md s5).",
                              ge=0, le=1)
    weak_strength_min: float = option(0.05, "Lower end of w ~ U[min, max], drawn once per batch (METHOD.md s5).",
                                      ge=0, le=1)
    weak_strength_max: float = option(0.25, "Upper end of w ~ U[min, max] (METHOD.md s5).", ge=0, le=1)
    lr_aug_mu: float = option(5.0, "LR-latent noise augmentation a = sigmoid(N(mu, sigma)) (METHOD.md s5).")
    lr_aug_sigma: float = option(1.0, "Std of the normal inside the sigmoid of the LR noise augmentation.", ge=0)
    steps: int = option(25, "Euler steps of the multi-step sampler (METHOD.md s6: 25).", ge=1)
    schedule: str = option("linear", "Time schedule of the sampler: linear (default) or cosine.",
                           choices=["linear", "cosine"])
    guidance_scale: float = option(0.5, "Guidance s in v = v_w + s (v_c - v_w). Explicit per preset (METHOD.md s0); "
                                   "README presets: -0.5 RealSR, 0.5 ScreenSR. s=1: full branch, s=0: partial.")
    weak_strength: float = option(0.15, "Weak-branch LR strength w at multi-step inference (METHOD.md s6: 0.15, "
                                  "a working option here).", ge=0, le=1)

    def validate(self) -> None:
        if self.weak_strength_min > self.weak_strength_max:
            raise ConfigError("flow.weak_strength_min must be <= flow.weak_strength_max")


@dataclass
class DistillConfig:
    method: str = option("rcgm", "Consistency loss: rcgm (recursive consistency, default) or shortcut.",
                         choices=["rcgm", "shortcut"])
    omega: float = option(0.5, "Guidance omega of the teacher target v_w + omega (v_c - v_w) (METHOD.md s7).")
    weak_strength: float = option(0.1, "Fixed weak-branch strength during distillation (METHOD.md s7: 0.1).",
                                  ge=0, le=1)
    delta_t: float = option(0.01, "RCGM finite-difference step Delta (METHOD.md s7: 0.01).", gt=0, lt=1)
    rollout_steps: int = option(2, "RCGM student roll-out steps N (METHOD.md s7: 2).", ge=1)
    consistency_weight: float = option(1.0, "Weight of the consistency term (u_weight, METHOD.md s7: 1.0).", ge=0)
    clip: float = option(1.0, "Element-wise clip of the RCGM correction (METHOD.md s7: 1).", gt=0)
    onestep_steps: int = option(1, "Steps of the few-step student sampler at inference (1 = one-step).", ge=1)


@dataclass
class DegradeConfig:
    preset: str = option("realesrgan", "Degradation preset: realesrgan (second-order Real-ESRGAN x4, METHOD.md s1) "
                         "or bicubic (classic x4 bicubic down).", choices=["realesrgan", "bicubic"])
    scale: int = option(4, "Super-resolution factor (x4 in the paper).", ge=1)
    resize_back: bool = option(True, "Resize the LR back to HR size (resize_bak=True, METHOD.md s1) before encoding.")
