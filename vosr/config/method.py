"""Configuration sections of the method library: backbone, encoders, flow matching, distillation, degradation.

Constants cite docs/method.md (the method as this repository implements it) or the paper (VOSR, arXiv).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import SCHEDULES
from .schema import ConfigError, option


@dataclass
class ModelConfig:
    hidden_size: int = option(96, "DiT width D (docs/method.md s4: 1024 for 0.5B, 1536 for 1.4B).", ge=8)
    depth: int = option(4, "Number of DiT blocks (28 for 0.5B, 36 for 1.4B).", ge=1)
    num_heads: int = option(4, "Attention heads; head_dim = D / heads (64 in both real presets).", ge=1)
    patch_size: int = option(2, "Patch size over the latent grid (paper A.3: 2).", ge=1)
    mlp_ratio: float = option(4.0, "MLP ratio; the SwiGLU hidden width is int(2/3 * ratio * D) = int(8D/3) at 4.",
                              gt=0)
    encdim_ratio: int = option(3, "Hidden ratio of the semantic-token projection MLP (docs/method.md s3: 3).", ge=1)
    time_freq_dim: int = option(256, "Sinusoid size of the time embedding (DiT: 256).", ge=8)
    rope_theta: float = option(10000.0, "RoPE base frequency (docs/method.md s4: 10000).", gt=0)
    qk_norm: bool = option(True, "RMSNorm on queries and keys in self- and cross-attention (docs/method.md s4).")
    rope_arithmetic: str = option("float64", "How the RoPE cos/sin tables are computed: float64 angles rounded once "
                                  "(default), or float32 as the released VOSR models do it, which models imported "
                                  "from the authors' release use (bit-identical tables; vosr/model/rope.py).",
                                  choices=["float64", "float32"])

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
    path: str = option("", "Local folder with the VAE weights in diffusers layout (config.json + *.safetensors): "
                       "the vae folder itself or a repo folder holding vae/ (for qwen2d also the authors' "
                       "Qwen-Image-vae-2d folder), or an hf:// URI of one (fetched into the Hugging Face cache "
                       "only because it is named). Unused by pixel.")
    light_decoder: str = option("", "sd21 only: the authors' light SD2.1 decoder (sd21_lwdecoder.pth, or its "
                                ".safetensors conversion; a local file or an hf:// URI) to decode with instead of the "
                                "VAE's own decoder (docs/method.md s2). Empty: the checkpoint's choice (released "
                                "VOSR-0.5B models name it); 'none': always the full decoder.")
    downsample: int = option(4, "Spatial factor of the pixel codec (sd21 and qwen2d are fixed at 8).", ge=1)
    sample_posterior: bool = option(True, "Encode with a posterior sample (reference behaviour) instead of the mode.")
    inference_sample_posterior: bool = option(True, "Posterior sample at inference too (docs/method.md s0: mode is "
                                              "an option; the default follows the reference).")


@dataclass
class SemanticConfig:
    name: str = option("tiny_vit", "Semantic encoder registry name: tiny_vit (small ViT, fixed-seed random weights; "
                       "carries no semantics), dinov2_vitb14, dinov2_vitl14.",
                       choices=["tiny_vit", "dinov2_vitb14", "dinov2_vitl14"])
    path: str = option("", "Weights for DINOv2 (optional for tiny_vit): a .pth or .safetensors file (timm or "
                       "original DINOv2 key layout), or a torch.hub cache folder holding "
                       "hub/checkpoints/dinov2_vit{b,l}14_pretrain.pth (the authors' torch_cache), or an hf:// URI "
                       "of either; nothing that is not named is downloaded.")
    layer: int = option(2, "Block whose output is used, 0-based, CLS removed, no final norm (docs/method.md s3: "
                        "8 for ViT-B/14, 17 for ViT-L/14).", ge=0)
    input_size: int = option(64, "Square input size the upsampled LR is bicubic-resized to (448 for DINOv2 -> "
                             "32x32 tokens).", ge=14)
    allow_random: bool = option(False, "Let a real preset run with randomly initialised semantic weights "
                                "(only for tests and benchmarks; the result carries no semantics).")
    width: int = option(64, "tiny_vit only: token width.", ge=8)
    depth: int = option(3, "tiny_vit only: number of blocks.", ge=1)
    num_heads: int = option(4, "tiny_vit only: attention heads.", ge=1)
    patch_size: int = option(8, "tiny_vit only: patch size in pixels.", ge=1)
    seed: int = option(1234, "Seed of the fixed random weights of tiny_vit (and of DINOv2 under allow_random).")


@dataclass
class FlowConfig:
    cfg_ratio: float = option(0.1, "Probability per sample of the partial (weak) branch in training "
                              "(docs/method.md s5).", ge=0, le=1)
    weak_strength_min: float = option(0.05, "Lower end of w ~ U[min, max], drawn once per batch (docs/method.md s5).",
                                      ge=0, le=1)
    weak_strength_max: float = option(0.25, "Upper end of w ~ U[min, max] (docs/method.md s5).", ge=0, le=1)
    lr_aug_mu: float = option(5.0, "LR-latent noise augmentation a = sigmoid(N(mu, sigma)) (docs/method.md s5).")
    lr_aug_sigma: float = option(1.0, "Std of the normal inside the sigmoid of the LR noise augmentation.", ge=0)
    steps: int = option(25, "Euler steps of the multi-step sampler (docs/method.md s6: 25).", ge=1)
    schedule: str = option("linear", "Time schedule of the sampler: linear (default) or cosine.",
                           choices=list(SCHEDULES))
    guidance_scale: float = option(0.5, "Guidance s in v = v_w + s (v_c - v_w). The same default for "
                                   "every preset (the presets set no flow keys; docs/method.md s0); set it per "
                                   "run: the paper's README uses -0.5 for RealSR, 0.5 for ScreenSR. s=1: full "
                                   "branch, s=0: partial.")
    weak_strength: float = option(0.15, "Weak-branch LR strength w at multi-step inference (docs/method.md s6: 0.15, "
                                  "a working option here).", ge=0, le=1)

    def validate(self) -> None:
        if self.weak_strength_min > self.weak_strength_max:
            raise ConfigError("flow.weak_strength_min must be <= flow.weak_strength_max")


@dataclass
class DistillConfig:
    method: str = option("rcgm", "Consistency loss: rcgm (recursive consistency, default) or shortcut.",
                         choices=["rcgm", "shortcut"])
    omega: float = option(0.5, "Guidance omega of the teacher target v_w + omega (v_c - v_w) (docs/method.md s7).")
    weak_strength: float = option(0.1, "Fixed weak-branch strength during distillation (docs/method.md s7: 0.1).",
                                  ge=0, le=1)
    delta_t: float = option(0.01, "RCGM finite-difference step Delta (docs/method.md s7: 0.01).", gt=0, lt=1)
    rollout_steps: int = option(2, "RCGM student roll-out steps N (docs/method.md s7: 2).", ge=1)
    consistency_weight: float = option(1.0, "Weight of the consistency term (u_weight, docs/method.md s7: 1.0).",
                                       ge=0)
    clip: float = option(1.0, "Element-wise clip of the RCGM correction (docs/method.md s7: 1).", gt=0)
    onestep_steps: int = option(1, "Steps of the few-step student sampler at inference (1 = one-step).", ge=1)


_SIZES = [7, 9, 11, 13, 15, 17, 19, 21]  # Real-ESRGAN kernel_range: odd sizes 7..21 (docs/method.md s1)
_FAMILIES = ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
_FAMILY_PROBS = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]  # docs/method.md s1 random_mixed_kernels


def _check_probs(name: str, probs: list[float], n: int) -> None:
    if len(probs) != n:
        raise ConfigError(f"{name}: expected {n} probabilities, got {len(probs)}")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ConfigError(f"{name}: probabilities must be >= 0 and sum to 1, got {probs}")


def _check_range(name: str, rng: list[float]) -> None:
    if len(rng) != 2 or rng[0] > rng[1]:
        raise ConfigError(f"{name}: expected [low, high] with low <= high, got {rng}")


@dataclass
class RealESRGANConfig:
    """Every constant of the second-order Real-ESRGAN x4 degradation (docs/method.md s1, params_realsr.yml)."""

    kernel_sizes: list[int] = option(_SIZES, "Odd blur/sinc kernel sizes drawn uniformly (docs/method.md s1: 7..21).")
    kernel_pad_to: int = option(21, "Every kernel is zero-padded to this size (docs/method.md s1: 21).", ge=1)
    kernel_families: list[str] = option(_FAMILIES, "Kernel families of random_mixed_kernels.")
    kernel_probs: list[float] = option(_FAMILY_PROBS, "Probabilities of the first-stage families "
                                       "(docs/method.md s1).")
    sinc_prob: float = option(0.1, "Probability that k1 is a sinc (circular low-pass) kernel.", ge=0, le=1)
    blur_sigma: list[float] = option([0.2, 3.0], "Gaussian sigma range of k1 (docs/method.md s1).")
    betag_range: list[float] = option([0.5, 4.0], "Generalised-Gaussian beta range of k1.")
    betap_range: list[float] = option([1.0, 2.0], "Plateau beta range of k1.")
    kernel_probs2: list[float] = option(_FAMILY_PROBS, "Probabilities of the second-stage families.")
    sinc_prob2: float = option(0.1, "Probability that k2 is a sinc kernel.", ge=0, le=1)
    blur_sigma2: list[float] = option([0.2, 1.5], "Gaussian sigma range of k2 (docs/method.md s1).")
    betag_range2: list[float] = option([0.5, 4.0], "Generalised-Gaussian beta range of k2.")
    betap_range2: list[float] = option([1.0, 2.0], "Plateau beta range of k2.")
    final_sinc_prob: float = option(0.8, "Probability of the final sinc filter; otherwise a delta "
                                    "(docs/method.md s1).", ge=0, le=1)
    resize_modes: list[str] = option(["area", "bilinear", "bicubic"], "Interpolation modes drawn uniformly for "
                                     "every resize, including the resize back to HR size.")
    resize_prob: list[float] = option([0.2, 0.7, 0.1], "Stage-1 up / down / keep probabilities.")
    resize_range: list[float] = option([0.15, 1.5], "Stage-1 factor: down ~ U(low, 1), up ~ U(1, high).")
    gaussian_noise_prob: float = option(0.5, "Stage-1 probability of Gaussian (else Poisson) noise.", ge=0, le=1)
    noise_range: list[float] = option([1.0, 30.0], "Stage-1 Gaussian sigma range, in 8-bit levels (/255).")
    poisson_scale_range: list[float] = option([0.05, 3.0], "Stage-1 Poisson scale range.")
    gray_noise_prob: float = option(0.4, "Stage-1 probability that the noise is grey (shared by channels).",
                                    ge=0, le=1)
    jpeg_range: list[float] = option([30.0, 95.0], "Stage-1 JPEG quality range.")
    second_blur_prob: float = option(0.8, "Probability of the stage-2 blur with k2.", ge=0, le=1)
    resize_prob2: list[float] = option([0.3, 0.4, 0.3], "Stage-2 up / down / keep probabilities.")
    resize_range2: list[float] = option([0.3, 1.2], "Stage-2 factor s of the size (ori/scale)*s.")
    gaussian_noise_prob2: float = option(0.5, "Stage-2 probability of Gaussian (else Poisson) noise.", ge=0, le=1)
    noise_range2: list[float] = option([1.0, 25.0], "Stage-2 Gaussian sigma range, in 8-bit levels (/255).")
    poisson_scale_range2: list[float] = option([0.05, 2.5], "Stage-2 Poisson scale range.")
    gray_noise_prob2: float = option(0.4, "Stage-2 grey-noise probability.", ge=0, le=1)
    jpeg_range2: list[float] = option([30.0, 95.0], "Final-step JPEG quality range.")
    final_order_prob: float = option(0.5, "Probability of [resize + sinc] then JPEG (else JPEG first) "
                                     "(docs/method.md s1: 50/50).", ge=0, le=1)

    def validate(self) -> None:
        n = len(self.kernel_families)
        for fam in self.kernel_families:
            if fam not in _FAMILIES:
                raise ConfigError(f"degrade.realesrgan.kernel_families: unknown family {fam!r}; known: {_FAMILIES}")
        _check_probs("degrade.realesrgan.kernel_probs", self.kernel_probs, n)
        _check_probs("degrade.realesrgan.kernel_probs2", self.kernel_probs2, n)
        _check_probs("degrade.realesrgan.resize_prob", self.resize_prob, 3)
        _check_probs("degrade.realesrgan.resize_prob2", self.resize_prob2, 3)
        for mode in self.resize_modes:
            if mode not in ("area", "bilinear", "bicubic", "nearest"):
                raise ConfigError(f"degrade.realesrgan.resize_modes: unknown mode {mode!r}")
        if not self.kernel_sizes or any(k % 2 == 0 or k < 1 or k > self.kernel_pad_to for k in self.kernel_sizes):
            raise ConfigError("degrade.realesrgan.kernel_sizes: odd sizes no larger than kernel_pad_to, got "
                              f"{self.kernel_sizes}")
        for name in ("blur_sigma", "betag_range", "betap_range", "blur_sigma2", "betag_range2", "betap_range2",
                     "resize_range", "noise_range", "poisson_scale_range", "jpeg_range", "resize_range2",
                     "noise_range2", "poisson_scale_range2", "jpeg_range2"):
            _check_range(f"degrade.realesrgan.{name}", getattr(self, name))
        for name in ("jpeg_range", "jpeg_range2"):
            lo, hi = getattr(self, name)
            if lo < 1 or hi > 100:
                raise ConfigError(f"degrade.realesrgan.{name}: JPEG quality must lie in [1, 100]")


@dataclass
class DegradeConfig:
    preset: str = option("realesrgan", "Degradation preset: realesrgan (second-order Real-ESRGAN x4, "
                         "docs/method.md s1) or bicubic (classic x4 bicubic down).",
                         choices=["realesrgan", "bicubic"])
    scale: int = option(4, "Super-resolution factor (x4 in the paper).", ge=1)
    resize_back: bool = option(True, "Resize the LR back to HR size (resize_bak=True, docs/method.md s1) before "
                               "encoding.")
    realesrgan: RealESRGANConfig = option(RealESRGANConfig(), "Parameters of the realesrgan preset "
                                          "(docs/method.md s1).")
