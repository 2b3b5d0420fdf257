"""Perceptual metrics computed offline from weight / parameter files a user points at (no pyiqa, no download).

Two metrics of the SR tables, each from a file the user has locally:

- `stlpips` (full reference, lower is better): ST-LPIPS, the shift-tolerant LPIPS of Ghildyal & Liu (ECCV 2022),
  AlexNet variant. File `alex_shift_tolerant.pth` holds the whole network (the anti-aliased AlexNet trunk with
  stride-1 first conv and blur-pool downsampling, plus the five 1x1 linear heads); it is the file pyiqa's
  `stlpips` metric downloads and the one the `stlpips-pytorch` wheel ships (weights/vST0.0/). Score =
  sum over the 5 layers of mean_xy(w_l . (f0_l - f1_l)^2), f unit-normalised over channels, inputs in [-1, 1]
  shifted/scaled by the LPIPS scaling layer.
- `niqe` (no reference, lower is better): NIQE of Mittal et al. (IEEE SPL 2013) with the pristine multivariate
  Gaussian of the original release: `niqe_pris_params.npz` (BasicSR's copy: mu_pris_param, cov_pris_param,
  gaussian_window) or `niqe_modelparameters.mat` (pyiqa's: mu_prisparam, cov_prisparam). MATLAB conventions:
  Y of YCbCr (BT.601, 16-235) rounded, 96x96 blocks without overlap, 18 AGGD features per block at full and at
  half size (MATLAB-style antialiased bicubic), distance sqrt((mu_p - mu_d)^T ((S_p + S_d)/2)^+ (mu_p - mu_d)).
  An image needs at least two whole blocks (192 x 96 px) for the covariance; smaller ones give NaN, counted.

Where files are looked for, in order: `eval.metric_weights` entries (`metric=file` or a folder holding the file
names above), then pyiqa's cache folder ($TORCH_HOME/hub/pyiqa, i.e. torch.hub.get_dir()/pyiqa), the folder
pyiqa itself fills when it has network.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

# metric -> accepted file names (first found wins)
KNOWN_FILES: dict[str, tuple[str, ...]] = {
    "stlpips": ("alex_shift_tolerant.pth",),
    "niqe": ("niqe_pris_params.npz", "niqe_modelparameters.mat"),
}
# file types pyiqa's own implementation loads (create_metric(..., pretrained_model_path=...)); used first when the
# iqa extra is installed, with this module as the fallback
PYIQA_LOADS: dict[str, tuple[str, ...]] = {"stlpips": (".pth",), "niqe": (".mat",)}
NIQE_BLOCK = 96                # block size of the original NIQE release


def pyiqa_cache_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "pyiqa"


def parse_weight_entries(entries: list[str]) -> tuple[dict[str, Path], list[Path]]:
    """`metric=file` entries and plain folders. A named file that does not exist is an error."""
    named: dict[str, Path] = {}
    folders: list[Path] = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if sep and "/" not in name:
            p = Path(path).expanduser()
            if name not in KNOWN_FILES:
                raise ValueError(f"eval.metric_weights: no local loader for metric {name!r} (known: "
                                 f"{', '.join(sorted(KNOWN_FILES))}); pyiqa metrics use pyiqa's own cache")
            if not p.is_file():
                raise ValueError(f"eval.metric_weights: {name}={p}: no such file")
            named[name] = p
        else:
            p = Path(entry).expanduser()
            if not p.is_dir():
                raise ValueError(f"eval.metric_weights: {p} is neither metric=file nor a folder")
            folders.append(p)
    return named, folders


def find_file(metric: str, named: dict[str, Path], folders: list[Path]) -> Path | None:
    if metric in named:
        return named[metric]
    for folder in [*folders, pyiqa_cache_dir()]:
        for fname in KNOWN_FILES.get(metric, ()):
            hits = sorted(folder.rglob(fname)) if folder.is_dir() else []
            if hits:
                return hits[0]
    return None


# --- ST-LPIPS -------------------------------------------------------------------------------------------------

def _build_stlpips():
    """The shift-tolerant AlexNet LPIPS with the module names of the released state dict."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Blur(nn.Module):                # blur-pool: reflect pad 2 (filter 3, "pad more"), [1 2 1]^2/16, stride 2
        def __init__(self, channels: int):
            super().__init__()
            a = torch.tensor([1.0, 2.0, 1.0])
            k = torch.outer(a, a) / 16.0
            self.register_buffer("filt", k[None, None].repeat(channels, 1, 1, 1))

        def forward(self, x):
            return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.filt, stride=2, groups=x.shape[1])

    relu = lambda: nn.ReLU(inplace=False)  # noqa: E731
    feats = [nn.Conv2d(3, 64, 11, 1, 2), Blur(64), relu(), nn.MaxPool2d(3, 1), Blur(64),
             nn.Conv2d(64, 192, 5, padding=2), relu(), nn.MaxPool2d(3, 1), Blur(192),
             nn.Conv2d(192, 384, 3, padding=1), relu(), nn.Conv2d(384, 256, 3, padding=1), relu(),
             nn.Conv2d(256, 256, 3, padding=1), relu()]
    cuts = [(0, 3), (3, 7), (7, 11), (11, 13), (13, 15)]

    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            for i, (a, b) in enumerate(cuts, 1):
                seq = nn.Sequential()
                for j in range(a, b):
                    seq.add_module(str(j), feats[j])
                setattr(self, f"slice{i}", seq)

        def forward(self, x):
            outs = []
            for i in range(1, 6):
                x = getattr(self, f"slice{i}")(x)
                outs.append(x)
            return outs

    class Lin(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))

    class STLPIPS(nn.Module):
        def __init__(self):
            super().__init__()
            self.scaling_layer = nn.Module()
            self.scaling_layer.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
            self.scaling_layer.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
            self.net = Trunk()
            for i, c in enumerate([64, 192, 384, 256, 256]):
                setattr(self, f"lin{i}", Lin(c))

        def forward(self, x01, y01):
            sl = self.scaling_layer
            fx = self.net(((2 * x01 - 1) - sl.shift) / sl.scale)
            fy = self.net(((2 * y01 - 1) - sl.shift) / sl.scale)
            total = 0.0
            for i, (a, b) in enumerate(zip(fx, fy)):
                a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + getattr(self, f"lin{i}").model[1]((a - b) ** 2).mean((2, 3))
            return total.flatten()

    return STLPIPS()


class STLPIPSMetric:
    name = "stlpips"

    def __init__(self, path: Path, device: str = "cpu"):
        import torch

        self.path = path
        model = _build_stlpips()
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: not an ST-LPIPS AlexNet state dict (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    def __call__(self, sr, hr) -> float:
        import torch

        from vosr.upscaler import pil_to_batch

        with torch.inference_mode():
            return float(self.model(pil_to_batch([sr]).to(self.device), pil_to_batch([hr]).to(self.device))[0])


# --- NIQE -----------------------------------------------------------------------------------------------------

def _cubic(x: np.ndarray) -> np.ndarray:
    """MATLAB imresize's bicubic kernel (a = -0.5)."""
    ax = np.abs(x)
    ax2, ax3 = ax ** 2, ax ** 3
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _resize_matrix(n_in: int, scale: float) -> np.ndarray:
    """[n_out, n_in] weights of MATLAB imresize(..., scale, 'bicubic') along one axis, antialiased when
    scale < 1 (kernel stretched by 1/scale), borders mirrored ('symmetric')."""
    n_out = int(math.ceil(n_in * scale))
    width = 4.0 / scale if scale < 1 else 4.0
    x = np.arange(1, n_out + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    dist = u[:, None] - idx
    w = scale * _cubic(scale * dist) if scale < 1 else _cubic(dist)
    w = w / w.sum(1, keepdims=True)
    idx = idx - 1                                                  # to 0-based
    period = 2 * n_in
    idx = np.mod(idx, period)
    idx = np.where(idx >= n_in, period - 1 - idx, idx).astype(int)  # symmetric padding
    m = np.zeros((n_out, n_in))
    for r in range(n_out):
        np.add.at(m[r], idx[r], w[r])
    return m


def _aggd(block: np.ndarray) -> tuple[float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching (shape searched on 0.2:0.001:10)."""
    from scipy.special import gamma

    v = block.ravel()
    gam = np.arange(0.2, 10.001, 0.001)
    r_gam = gamma(2 / gam) ** 2 / (gamma(1 / gam) * gamma(3 / gam))
    left = math.sqrt(np.mean(v[v < 0] ** 2)) if np.any(v < 0) else 0.0
    right = math.sqrt(np.mean(v[v > 0] ** 2)) if np.any(v > 0) else 0.0
    if left == 0.0 or right == 0.0:
        return float("nan"), float("nan"), float("nan")
    ghat = left / right
    rhat = np.mean(np.abs(v)) ** 2 / np.mean(v ** 2)
    rnorm = rhat * (ghat ** 3 + 1) * (ghat + 1) / (ghat ** 2 + 1) ** 2
    alpha = float(gam[np.argmin((r_gam - rnorm) ** 2)])
    k = math.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, left * k, right * k


def _block_features(block: np.ndarray) -> list[float]:
    from scipy.special import gamma

    alpha, bl, br = _aggd(block)
    feats = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a, l_, r_ = _aggd(block * np.roll(block, shift, axis=(0, 1)))
        mean = (r_ - l_) * gamma(2 / a) / gamma(1 / a) if math.isfinite(a) else float("nan")
        feats += [a, mean, l_, r_]
    return feats


class NIQEMetric:
    name = "niqe"

    def __init__(self, path: Path, device: str = "cpu"):
        if path.suffix == ".npz":
            data = np.load(path)
            self.mu, self.cov, self.window = data["mu_pris_param"], data["cov_pris_param"], data["gaussian_window"]
        elif path.suffix == ".mat":
            from scipy.io import loadmat

            data = loadmat(str(path))
            self.mu, self.cov = data["mu_prisparam"], data["cov_prisparam"]
            g = np.exp(-(np.arange(-3, 4) ** 2) / (2 * (7 / 6) ** 2))   # fspecial('gaussian', 7, 7/6)
            self.window = np.outer(g, g) / np.outer(g, g).sum()
        else:
            raise ValueError(f"{path}: NIQE parameters must be a .npz (BasicSR) or .mat (pyiqa) file")
        self.mu = np.asarray(self.mu, dtype=np.float64).reshape(-1)
        self.cov = np.asarray(self.cov, dtype=np.float64)
        if self.mu.shape != (36,) or self.cov.shape != (36, 36):
            raise ValueError(f"{path}: expected a 36-d pristine mean and 36x36 covariance, got {self.mu.shape}, "
                             f"{self.cov.shape}")
        self.path = path

    def score_y(self, y: np.ndarray) -> float:
        """NIQE of a Y image on the 0-255 scale (already rounded)."""
        from scipy.ndimage import convolve

        nh, nw = y.shape[0] // NIQE_BLOCK, y.shape[1] // NIQE_BLOCK
        if nh * nw < 2:
            return float("nan")
        img = y[: nh * NIQE_BLOCK, : nw * NIQE_BLOCK].astype(np.float64)
        per_scale = []
        for scale in (1, 2):
            mu = convolve(img, self.window, mode="nearest")
            sigma = np.sqrt(np.abs(convolve(img * img, self.window, mode="nearest") - mu * mu))
            mscn = (img - mu) / (sigma + 1)
            b = NIQE_BLOCK // scale
            per_scale.append(np.array([_block_features(mscn[i * b:(i + 1) * b, j * b:(j + 1) * b])
                                       for j in range(nw) for i in range(nh)]))
            if scale == 1:
                mh, mw = _resize_matrix(img.shape[0], 0.5), _resize_matrix(img.shape[1], 0.5)
                img = (mh @ (img / 255.0) @ mw.T) * 255.0
        feats = np.concatenate(per_scale, axis=1)
        mu_d = np.nanmean(feats, axis=0)
        cov_d = np.cov(feats[~np.isnan(feats).any(axis=1)], rowvar=False)
        d = self.mu - mu_d
        return float(math.sqrt(max(float(d @ np.linalg.pinv((self.cov + cov_d) / 2) @ d), 0.0)))

    def __call__(self, sr, hr=None) -> float:
        from vosr.metrics import rgb_to_y

        return self.score_y(np.round(rgb_to_y(sr)))


LOADERS: dict[str, Any] = {"stlpips": STLPIPSMetric, "niqe": NIQEMetric}
