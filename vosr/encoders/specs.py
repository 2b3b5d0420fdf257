"""Static shapes of the autoencoders and semantic encoders, computed from the config alone (no weights).

Other parts (model construction, feature schemas, parameter counts) need the latent channel count, the spatial
factor, the semantic token width and the token count before any weights exist; these functions give them.
Registries fail loudly with the list of known names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class UnknownEncoderError(KeyError):
    """An autoencoder or semantic encoder name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class AutoencoderSpec:
    name: str
    latent_channels: int
    downsample: int


@dataclass(frozen=True)
class SemanticSpec:
    name: str
    dim: int
    num_tokens: int


def lookup(registry: dict[str, Any], kind: str, name: str) -> Any:
    """Registry access that fails with the known names listed (BasicSR style)."""
    if name not in registry:
        known = ", ".join(sorted(registry))
        raise UnknownEncoderError(f"unknown {kind} {name!r}; known {kind}s: {known}")
    return registry[name]


# --- autoencoders (docs/method.md s2) -------------------------------------------------------------------------------

def _pixel_spec(ae_cfg: Any) -> AutoencoderSpec:
    f = int(ae_cfg.downsample)
    # space-to-depth: every f x f block of RGB pixels becomes 3*f*f channels
    return AutoencoderSpec("pixel", 3 * f * f, f)


def _sd21_spec(ae_cfg: Any) -> AutoencoderSpec:
    # SD2.1 VAE: 4 latent channels, 3 down blocks -> factor 8 (docs/method.md s2); ae_cfg.downsample is not used
    return AutoencoderSpec("sd21", 4, 8)


def _qwen2d_spec(ae_cfg: Any) -> AutoencoderSpec:
    # Qwen-Image VAE on single frames: z_dim 16, spatial factor 8 (docs/method.md s2); ae_cfg.downsample is not used
    return AutoencoderSpec("qwen2d", 16, 8)


AUTOENCODER_SPECS: dict[str, Callable[[Any], AutoencoderSpec]] = {
    "pixel": _pixel_spec,
    "sd21": _sd21_spec,
    "qwen2d": _qwen2d_spec,
}


def autoencoder_spec(ae_cfg: Any) -> AutoencoderSpec:
    """(name, latent_channels, downsample) of the configured autoencoder, without loading weights."""
    return lookup(AUTOENCODER_SPECS, "autoencoder", ae_cfg.name)(ae_cfg)


# --- semantic encoders (docs/method.md s3) --------------------------------------------------------------------------

# Fixed architecture of the DINOv2 presets: (token width, patch size, depth, heads).
DINOV2_ARCH: dict[str, dict[str, int]] = {
    "dinov2_vitb14": {"dim": 768, "patch_size": 14, "depth": 12, "num_heads": 12},
    "dinov2_vitl14": {"dim": 1024, "patch_size": 14, "depth": 24, "num_heads": 16},
}


def semantic_arch(sem_cfg: Any) -> dict[str, int]:
    """Width, patch size, depth and heads of the configured semantic ViT."""
    name = sem_cfg.name
    if name == "tiny_vit":
        return {"dim": int(sem_cfg.width), "patch_size": int(sem_cfg.patch_size), "depth": int(sem_cfg.depth),
                "num_heads": int(sem_cfg.num_heads)}
    return dict(lookup(DINOV2_ARCH, "semantic encoder", name))


SEMANTIC_NAMES = ("tiny_vit", *DINOV2_ARCH)


def semantic_spec(sem_cfg: Any) -> SemanticSpec:
    """(name, dim, num_tokens) of the configured semantic encoder, without loading weights.

    Tokens: the input is resized to input_size x input_size, so the grid is (input_size // patch)^2
    (1024 for DINOv2 at 448, docs/method.md s3); the CLS token is removed.
    """
    lookup(dict.fromkeys(SEMANTIC_NAMES), "semantic encoder", sem_cfg.name)
    arch = semantic_arch(sem_cfg)
    grid = int(sem_cfg.input_size) // arch["patch_size"]
    if grid < 1:
        raise ValueError(f"semantic.input_size {sem_cfg.input_size} is smaller than the patch size "
                         f"{arch['patch_size']} of {sem_cfg.name}")
    return SemanticSpec(sem_cfg.name, arch["dim"], grid * grid)
