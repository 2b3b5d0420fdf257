"""Peer SR models for the evaluation table (`eval.peers`): local weight files loaded with spandrel.

A peer is `path` or `name=path`; spandrel detects the architecture (ESRGAN/Real-ESRGAN, SwinIR, HAT, DAT, ...)
from the state dict. Files it cannot load (e.g. ncnn .param/.bin exports, ONNX, a non-SR model) raise
`PeerError` naming the file and the reason, before any row runs. Nothing is downloaded: the files are local.

A peer runs on the same LR crops as the VOSR rows, with the same tiling (`inference.tile_size`, in output pixels,
and `inference.tile_overlap`): the LR is cut into tiles of tile_size / scale pixels overlapping by
max(tile_overlap / scale, tile / 8), each tile is upscaled, and the outputs are blended with the separable Gaussian
weights of vosr.tiling (docs/method.md s8), here in pixel space.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any


class PeerError(ValueError):
    """A peer entry that cannot be used (missing file, unsupported format or architecture, wrong scale)."""


@dataclasses.dataclass
class PeerSpec:
    name: str
    path: Path


def parse_peers(entries: list[str]) -> list[PeerSpec]:
    """`[name=]path` entries -> specs; the name defaults to the file stem, and names must be unique."""
    specs: list[PeerSpec] = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or "/" in name or not name.strip():      # a bare path (which may itself hold '=')
            name, path = "", entry
        p = Path(path.strip()).expanduser()
        specs.append(PeerSpec(name.strip() or p.stem, p))
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise PeerError(f"eval.peers: the name {s.name!r} is used twice; give one as name=path")
        seen.add(s.name)
    return specs


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class PeerUpscaler:
    """One loaded peer: `upscale(lr_image) -> SR image` at the model's scale, tiled like the VOSR rows."""

    def __init__(self, spec: PeerSpec, scale: int, device: str = "cpu", tile_size: int = 0, tile_overlap: int = 0):
        if not spec.path.is_file():
            raise PeerError(f"eval.peers: {spec.path} is not a file")
        try:
            import spandrel
        except ImportError as exc:
            raise PeerError("eval.peers needs spandrel (a core dependency of vosr; reinstall the project)") from exc
        try:
            with warnings.catch_warnings():       # spandrel's DAT builds its masks with torch.meshgrid
                warnings.filterwarnings("ignore", message=".*torch.meshgrid.*", category=UserWarning)
                desc = spandrel.ModelLoader(device="cpu").load_from_file(str(spec.path))
        except spandrel.UnsupportedModelError as exc:
            raise PeerError(f"eval.peers: {spec.path}: spandrel does not recognise the architecture of these "
                            f"weights ({exc})") from exc
        except Exception as exc:  # noqa: BLE001 - wrong extension, corrupt file, pickle error ...
            raise PeerError(f"eval.peers: {spec.path}: not a PyTorch/safetensors SR model spandrel can load "
                            f"(ncnn .param/.bin and ONNX exports are not supported): {exc}") from exc
        if not isinstance(desc, spandrel.ImageModelDescriptor) or desc.purpose not in ("SR", "Restoration"):
            raise PeerError(f"eval.peers: {spec.path}: a {desc.architecture.name} model for {desc.purpose}, not a "
                            "single-image SR model")
        if desc.scale != scale:
            raise PeerError(f"eval.peers: {spec.path}: a x{desc.scale} {desc.architecture.name} model; the "
                            f"evaluation runs at x{scale} (inference.upscale)")
        if desc.input_channels != 3 or desc.output_channels != 3:
            raise PeerError(f"eval.peers: {spec.path}: {desc.input_channels}->{desc.output_channels} channels; "
                            "only RGB models are supported")
        import torch

        self.spec = spec
        self.name = spec.name
        self.scale = scale
        self.architecture = desc.architecture.name
        self.device = torch.device(device)
        self.descriptor = desc.to(self.device).eval()
        self.min_size = max(int(desc.size_requirements.minimum), 1)
        self.tile_lr = tile_size // scale if tile_size else 0
        self.overlap_lr = tile_overlap // scale
        self.sha256 = sha256_file(spec.path)
        self.params = sum(p.numel() for p in desc.model.parameters())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.spec.path), "sha256": self.sha256,
                "architecture": self.architecture, "scale": self.scale, "params": self.params}

    def _run(self, x):
        import torch
        import torch.nn.functional as F

        h, w = x.shape[-2:]
        ph, pw = max(self.min_size - h, 0), max(self.min_size - w, 0)
        if ph or pw:                                     # below the model's minimum input: reflect-pad, crop back
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        with torch.inference_mode(), warnings.catch_warnings():
            # spandrel's DAT calls torch.meshgrid without `indexing`: one UserWarning per tile otherwise
            warnings.filterwarnings("ignore", message=".*torch.meshgrid.*", category=UserWarning)
            y = self.descriptor(x)
        return y[..., : h * self.scale, : w * self.scale]

    def upscale_tensor(self, lr):
        """[1, 3, h, w] in [0, 1] -> [1, 3, h*scale, w*scale]."""
        import torch

        from vosr.tiling import GAUSSIAN_VAR, tile_starts

        def ramp(n: int):          # vosr.tiling.gaussian_weights' 1-D factor, for rectangular tiles
            i = torch.arange(n, dtype=torch.float64)
            return torch.exp(-(((i - (n - 1) / 2) / n) ** 2) / (2 * GAUSSIAN_VAR)).float()

        h, w = lr.shape[-2:]
        t = self.tile_lr
        if not t or (h <= t and w <= t):
            return self._run(lr).clamp(0, 1)
        th, tw = min(t, h), min(t, w)
        ov = min(max(self.overlap_lr, t // 8), min(th, tw) - 1)
        s = self.scale
        out = torch.zeros(1, 3, h * s, w * s, device=lr.device)
        acc = torch.zeros(1, 1, h * s, w * s, device=lr.device)
        wt = torch.outer(ramp(th * s), ramp(tw * s)).to(lr.device)
        for y0 in tile_starts(h, th, th - ov):
            for x0 in tile_starts(w, tw, tw - ov):
                tile = self._run(lr[..., y0:y0 + th, x0:x0 + tw])
                out[..., y0 * s:(y0 + th) * s, x0 * s:(x0 + tw) * s] += tile * wt
                acc[..., y0 * s:(y0 + th) * s, x0 * s:(x0 + tw) * s] += wt
        return (out / acc).clamp(0, 1)

    def upscale(self, image, seed: int | None = None, **_: Any):
        """PIL RGB LR -> PIL RGB SR (deterministic; `seed` and the VOSR row options are ignored)."""
        from vosr.upscaler import batch_to_pil, pil_to_batch

        return batch_to_pil(self.upscale_tensor(pil_to_batch([image]).to(self.device)))[0]


def load_peers(entries: list[str], scale: int, device: str = "cpu", tile_size: int = 0,
               tile_overlap: int = 0) -> list[PeerUpscaler]:
    """Every entry loaded, or one PeerError listing every file that could not be (so a user fixes all at once)."""
    peers, errors = [], []
    for spec in parse_peers(entries):
        try:
            peers.append(PeerUpscaler(spec, scale, device, tile_size, tile_overlap))
        except PeerError as exc:
            errors.append(str(exc))
    if errors:
        raise PeerError("unsupported peer file(s):\n  " + "\n  ".join(errors))
    return peers
