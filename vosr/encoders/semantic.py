"""Frozen semantic encoders (docs/method.md s3): DINOv2 ViT-B/14, ViT-L/14 and a tiny fixed-seed ViT, all timm.

Input: the x4-upsampled LR image in [0, 1] [B, 3, H, W]. It is bicubic-resized to exactly input_size x input_size
(aspect ratio ignored, as the reference does), clipped to [0, 1], ImageNet-normalised, and run through the ViT up
to and including block `layer` (0-based). The output is that block's residual-stream tokens with the CLS token
(and any register tokens) removed and no final norm: [B, (input_size // patch)^2, dim] float32.

One code path for every encoder: timm's `VisionTransformer`. Weight files (`semantic.path`; a torch.hub cache
folder, as the VOSR authors ship theirs, names the file inside it: hub_cache_candidates) may be .safetensors
or .pth (read with torch.load(weights_only=True), never an arbitrary unpickle) in either key layout:
  - timm layout (e.g. model.safetensors of the HF repo timm/vit_base_patch14_dinov2.lvd142m), or
  - the original facebookresearch/dinov2 layout (dinov2_vitb14_pretrain.pth / dinov2_vitl14_pretrain.pth,
    with mask_token; block_chunks=0 as in the torch.hub models).
Both go through timm's own checkpoint filter (key layout). The positional embedding is resampled first, from the
checkpoint's grid (37x37 at 518 px) to the input grid (32x32 at 448), exactly as the released DINOv2 does it in
`interpolate_pos_encoding` (facebookresearch/dinov2, hub models: interpolate_offset 0.1, interpolate_antialias
False): float32, bicubic, no antialias, driven by scale_factor (n + 0.1) / M rather than by the output size, so the
source coordinates (i + 0.5) * M / (n + 0.1) - 0.5 are the released model's, not timm's size-based ones.

tiny_vit: weights drawn from a fixed seed (semantic.seed) unless semantic.path is given. Its random weights carry
NO semantics: it exists so the tiny preset exercises the exact conditioning path on a CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .specs import DINOV2_ARCH, lookup, semantic_arch, semantic_spec
from .weights import MissingWeightsError, file_sha256, state_dict_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # docs/method.md s3
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_LAYER_SCALE_INIT = 1e-5  # DINOv2 blocks carry LayerScale (ls1/ls2), as in timm's *_dinov2 models

_HOW = {
    "dinov2_vitb14": "a local copy of dinov2_vitb14_pretrain.pth (facebookresearch/dinov2 release; or the "
                     "torch.hub cache folder holding it, as the VOSR authors ship it: torch_cache/) or of "
                     "model.safetensors from the HF repo timm/vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "a local copy of dinov2_vitl14_pretrain.pth (facebookresearch/dinov2 release; or the "
                     "torch.hub cache folder holding it, as the VOSR authors ship it: torch_cache/) or of "
                     "model.safetensors from the HF repo timm/vit_large_patch14_dinov2.lvd142m",
}


def make_vit(arch: dict[str, int], input_size: int, layer_scale: bool, init: bool = True) -> nn.Module:
    """The timm VisionTransformer used by every semantic encoder (no head; CLS token, absolute positions).
    `init=False` skips timm's weight initialisation (seconds for ViT-L) when every weight is loaded next."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=input_size, patch_size=arch["patch_size"], embed_dim=arch["dim"],
                             depth=arch["depth"], num_heads=arch["num_heads"], num_classes=0,
                             init_values=DINOV2_LAYER_SCALE_INIT if layer_scale else None,
                             weight_init="" if init else "skip")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pth file (pth: weights_only unpickling; 'model'/'state_dict' unwrapped)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    if p.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(str(p), map_location="cpu", weights_only=True)
        for key in ("model", "state_dict", "teacher"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        if not isinstance(state, dict):
            raise ValueError(f"{p}: expected a state dict of tensors, found {type(state).__name__}")
        return state
    raise ValueError(f"{p}: unsupported weights file type {p.suffix!r}; use .safetensors or .pth")


DINOV2_INTERPOLATE_OFFSET = 0.1  # dinov2 hub models' interpolate_offset ("avoid floating point error", dino#8)


def dinov2_resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1,
                              offset: float = DINOV2_INTERPOLATE_OFFSET) -> torch.Tensor:
    """[1, prefix + M*M, D] position table -> [1, prefix + gh*gw, D], the released DINOv2's interpolation.

    Prefix (CLS) rows are kept; the M x M patch grid is resampled in float32 with F.interpolate(mode="bicubic",
    antialias=False, scale_factor=((gh + offset) / M, (gw + offset) / M)); the result is cast back."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, N, D], got {tuple(pos_embed.shape)}")
    n = pos_embed.shape[1] - num_prefix
    m = int(round(n ** 0.5))
    if m * m != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    gh, gw = int(grid[0]), int(grid[1])
    if (gh, gw) == (m, m):
        return pos_embed
    dim = pos_embed.shape[-1]
    pe = pos_embed.float()
    patch = pe[:, num_prefix:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=(float(gh + offset) / m, float(gw + offset) / m), mode="bicubic",
                          antialias=False)
    if tuple(patch.shape[-2:]) != (gh, gw):
        raise ValueError(f"DINOv2 position resampling gave {tuple(patch.shape[-2:])}, expected {(gh, gw)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)
    return torch.cat([pe[:, :num_prefix], patch], dim=1).to(pos_embed.dtype)


def load_vit_weights(vit: nn.Module, path: str | Path) -> None:
    """Load timm- or original-DINOv2-layout weights into `vit` (strict), resampling the position grid."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # the hub models' head is Identity
    pe = state.get("pos_embed")
    if pe is not None and pe.shape != vit.pos_embed.shape:  # timm's filter then leaves it as it is
        state["pos_embed"] = dinov2_resample_pos_embed(pe, tuple(vit.patch_embed.grid_size),
                                                       num_prefix=0 if vit.no_embed_class else vit.num_prefix_tokens)
    state = checkpoint_filter_fn(state, vit, interpolation="bicubic", antialias=False)
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the semantic ViT: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]} (arch and key layout must match; see "
                         "vosr/encoders/semantic.py)")


def seeded_vit(arch: dict[str, int], input_size: int, layer_scale: bool, seed: int) -> nn.Module:
    """A ViT whose random weights depend only on `seed` (drawn on the CPU generator, any device later)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return make_vit(arch, input_size, layer_scale)


def _preprocess(x: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"semantic encoder expects images [B, 3, H, W] in [0, 1], got {tuple(x.shape)}")
    x = x.to(mean.device, torch.float32)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (x.clamp(0.0, 1.0) - mean) / std


class _FrozenViT(nn.Module):
    """What both semantic encoders share: a frozen, always-eval ViT, its identity fields and the preprocessing
    (bicubic resize to input_size^2, aspect ignored, clip to [0, 1], ImageNet normalisation; docs/method.md s3)."""

    def __init__(self, name: str, vit: nn.Module, input_size: int, weights_sha256: str, source: str):
        super().__init__()
        self.name = name
        self.vit = vit
        self.input_size = int(input_size)
        self.dim = int(vit.embed_dim)
        self.weights_sha256 = weights_sha256
        self.source = source
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # frozen: always eval (no dropout / drop-path)
        return super().train(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Bicubic resize to input_size^2 (aspect ignored), clip to [0, 1], ImageNet normalisation."""
        return _preprocess(x, self.input_size, self.mean, self.std)

    def _vit_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.preprocess(x).to(self.vit.patch_embed.proj.weight.dtype)


class SemanticEncoder(_FrozenViT):
    """Frozen ViT feature extractor: upsampled LR in [0, 1] -> raw block-`layer` tokens [B, N, dim] float32."""

    def __init__(self, name: str, vit: nn.Module, input_size: int, layer: int, weights_sha256: str,
                 source: str):
        depth = len(vit.blocks)
        if not 0 <= layer < depth:
            raise ValueError(f"semantic.layer {layer} is out of range for {name} with {depth} blocks "
                             f"(0-based; docs/method.md s3: 8 for ViT-B/14, 17 for ViT-L/14)")
        vit.prune_intermediate_layers(indices=[layer], prune_norm=True, prune_head=True)  # blocks > layer unused
        super().__init__(name, vit, input_size, weights_sha256, source)
        self.layer = int(layer)
        grid = vit.patch_embed.grid_size
        self.num_tokens = int(grid[0] * grid[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            (tokens,) = self.vit.forward_intermediates(self._vit_input(x), indices=[self.layer], norm=False,
                                                       stop_early=True, output_fmt="NLC", intermediates_only=True)
        return tokens.float()

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "weights_sha256": self.weights_sha256, "layer": self.layer,
                "input_size": self.input_size, "dim": self.dim, "num_tokens": self.num_tokens,
                "source": self.source}


def hub_cache_candidates(folder: Path, name: str) -> list[Path]:
    """Where a torch.hub cache folder keeps `name`'s released weights (torch.hub.load downloads them to
    <hub dir>/checkpoints/; the authors ship their hub dir as torch_cache/, i.e. torch_cache/hub/checkpoints/)."""
    fname = f"{name}_pretrain.pth"
    return [folder / fname, folder / "checkpoints" / fname, folder / "hub" / "checkpoints" / fname]


def _weights_path(sem_cfg) -> Path | None:
    from ..hub import localize

    if not sem_cfg.path:
        return None
    p = Path(localize(sem_cfg.path)).expanduser()
    how = _HOW.get(sem_cfg.name, "a weights file saved from this encoder (timm layout)")
    if p.is_dir() or (not p.exists() and not p.suffix):     # a folder (a missing one has no file suffix)
        if sem_cfg.name not in DINOV2_ARCH:
            raise MissingWeightsError(f"semantic encoder {sem_cfg.name}: semantic.path {p} is a folder; give the "
                                      "weights file")
        found = [c for c in hub_cache_candidates(p, sem_cfg.name) if c.is_file()]
        if not found:
            looked = ", ".join(str(c) for c in hub_cache_candidates(p, sem_cfg.name))
            raise MissingWeightsError(f"semantic encoder {sem_cfg.name}: no weights in the folder {p} (looked for "
                                      f"{looked}). Provide {how} (downloaded by you beforehand; VOSR downloads "
                                      "nothing that is not named).")
        return found[0]
    if not p.is_file():
        raise MissingWeightsError(f"semantic encoder {sem_cfg.name}: weights file {p} not found. Provide {how} "
                                  "at that path (downloaded by you beforehand; VOSR downloads nothing).")
    return p


def _dinov2_vit(sem_cfg) -> tuple[str, nn.Module, str, str]:
    """(name, whole ViT with DINOv2 weights or allow_random seeded weights, weights sha256, source)."""
    arch = dict(lookup(DINOV2_ARCH, "semantic encoder", sem_cfg.name))
    path = _weights_path(sem_cfg)
    if path is None:
        if not sem_cfg.allow_random:
            raise MissingWeightsError(
                f"semantic encoder {sem_cfg.name}: semantic.path is empty. Set semantic.path to {_HOW[sem_cfg.name]}"
                " (downloaded by you beforehand; VOSR downloads nothing), or set semantic.allow_random=true for "
                "tests/benchmarks only.")
        warnings.warn(f"semantic encoder {sem_cfg.name} runs with RANDOM weights (semantic.allow_random=true): "
                      "its tokens carry NO semantics; use this only for tests and benchmarks", stacklevel=4)
        vit = seeded_vit(arch, sem_cfg.input_size, True, sem_cfg.seed)
        return sem_cfg.name, vit, state_dict_sha256(vit.state_dict()), f"random(seed={sem_cfg.seed})"
    vit = make_vit(arch, sem_cfg.input_size, True, init=False)   # load_vit_weights fills every weight
    load_vit_weights(vit, path)
    return sem_cfg.name, vit, file_sha256(path), str(path)


def _tiny_vit(sem_cfg) -> tuple[str, nn.Module, str, str]:
    """Small ViT for the tiny preset: fixed-seed random weights (no semantics) or weights from semantic.path."""
    arch = semantic_arch(sem_cfg)
    if arch["dim"] % arch["num_heads"]:
        raise ValueError(f"semantic.width {arch['dim']} must be divisible by semantic.num_heads {arch['num_heads']}")
    path = _weights_path(sem_cfg)
    if path is None:
        vit = seeded_vit(arch, sem_cfg.input_size, False, sem_cfg.seed)
        return "tiny_vit", vit, state_dict_sha256(vit.state_dict()), f"random(seed={sem_cfg.seed})"
    vit = make_vit(arch, sem_cfg.input_size, False, init=False)
    load_vit_weights(vit, path)
    return "tiny_vit", vit, file_sha256(path), str(path)


SEMANTIC_VITS = {"tiny_vit": _tiny_vit, "dinov2_vitb14": _dinov2_vit, "dinov2_vitl14": _dinov2_vit}


def _build_dinov2(sem_cfg) -> SemanticEncoder:
    name, vit, sha, source = _dinov2_vit(sem_cfg)
    return SemanticEncoder(name, vit, sem_cfg.input_size, sem_cfg.layer, sha, source)


def _build_tiny_vit(sem_cfg) -> SemanticEncoder:
    name, vit, sha, source = _tiny_vit(sem_cfg)
    return SemanticEncoder(name, vit, sem_cfg.input_size, sem_cfg.layer, sha, source)


SEMANTIC_ENCODERS = {"tiny_vit": _build_tiny_vit, "dinov2_vitb14": _build_dinov2, "dinov2_vitl14": _build_dinov2}


def build_semantic_encoder(sem_cfg, device: str | torch.device = "cpu") -> SemanticEncoder:
    """Build the configured frozen semantic encoder on `device` (see the module docstring)."""
    builder = lookup(SEMANTIC_ENCODERS, "semantic encoder", sem_cfg.name)
    enc = builder(sem_cfg)
    spec = semantic_spec(sem_cfg)
    if (enc.dim, enc.num_tokens) != (spec.dim, spec.num_tokens):
        raise ValueError(f"{sem_cfg.name}: built encoder gives {enc.num_tokens} tokens of width {enc.dim}, the "
                         f"static spec says {spec.num_tokens} x {spec.dim}")
    return enc.to(device)


class SemanticClsEncoder(_FrozenViT):
    """The same frozen ViT (same weights, same preprocessing) run to its full depth: image in [0, 1]
    [B, 3, H, W] -> final-norm CLS token [B, dim] float32, DINOv2's global image descriptor.

    Not part of the conditioning path (that is SemanticEncoder's block-`layer` patch tokens, docs/method.md s3); the
    curation job clusters images on it for category balancing (paper s4.1).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.vit.forward_features(self._vit_input(x))  # all blocks + final norm; token 0 is CLS
        return tokens[:, 0].float()

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "weights_sha256": self.weights_sha256, "output": "cls",
                "input_size": self.input_size, "dim": self.dim, "source": self.source}


def build_semantic_cls_encoder(sem_cfg, device: str | torch.device = "cpu") -> SemanticClsEncoder:
    """The configured semantic ViT at full depth returning the final CLS embedding [B, dim] (same weights and
    the same missing-weights errors as build_semantic_encoder)."""
    loader = lookup(SEMANTIC_VITS, "semantic encoder", sem_cfg.name)
    name, vit, sha, source = loader(sem_cfg)
    return SemanticClsEncoder(name, vit, sem_cfg.input_size, sha, source).to(device)


__all__ = ["SEMANTIC_ENCODERS", "SemanticClsEncoder", "SemanticEncoder", "build_semantic_cls_encoder",
           "build_semantic_encoder", "load_vit_weights", "make_vit",
           "read_state_dict"]
