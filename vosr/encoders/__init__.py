"""Frozen encoders of the method: the latent autoencoder (docs/method.md s2) and the semantic ViT (docs/method.md s3).

`autoencoder_spec` / `semantic_spec` give shapes from the config alone. `build_autoencoder` /
`build_semantic_encoder` load weights from local files only; nothing is ever downloaded.
"""

from .specs import (
    AutoencoderSpec,
    SemanticSpec,
    UnknownEncoderError,
    autoencoder_spec,
    semantic_spec,
)

__all__ = [
    "AutoencoderSpec",
    "SemanticSpec",
    "UnknownEncoderError",
    "autoencoder_spec",
    "semantic_spec",
    "build_autoencoder",
    "build_semantic_encoder",
    "build_semantic_cls_encoder",
]


def build_autoencoder(ae_cfg, device="cpu"):
    """Build the configured autoencoder (see vosr.encoders.autoencoders)."""
    from .autoencoders import build_autoencoder as _build

    return _build(ae_cfg, device=device)


def build_semantic_encoder(sem_cfg, device="cpu"):
    """Build the configured frozen semantic encoder (see vosr.encoders.semantic)."""
    from .semantic import build_semantic_encoder as _build

    return _build(sem_cfg, device=device)


def build_semantic_cls_encoder(sem_cfg, device="cpu"):
    """The configured semantic ViT at full depth -> final CLS embedding [B, dim] (see vosr.encoders.semantic)."""
    from .semantic import build_semantic_cls_encoder as _build

    return _build(sem_cfg, device=device)
