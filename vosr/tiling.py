"""Latent-space tiling with Gaussian velocity blending (docs/method.md s8, "Tiled path").

Large images are sampled tile by tile in latent space while the autoencoder still encodes and decodes the whole
image once. At every ODE step each tile's velocity is computed from its own crop of the noisy latent, the LR
latent and its own semantic tokens; the tile velocities are blended with separable Gaussian weights,
v = sum(w v) / sum(w), and one global Euler update follows. This module holds the geometry, the weights and
`TiledVelocity`, a wrapper that turns a per-batch velocity function into a whole-image velocity function for
`vosr.flow.euler_sample`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

VelocityFn = Callable[[torch.Tensor, float, float], torch.Tensor]

# Blend weights exp(-((i - (lt-1)/2) / lt)^2 / (2 * 0.01)), i.e. sigma = 0.1 * lt (docs/method.md s8).
GAUSSIAN_VAR = 0.01


@dataclass(frozen=True)
class Tile:
    """One square tile in latent coordinates: rows y0..y0+size, columns x0..x0+size."""

    y0: int
    x0: int
    size: int

    def latent_slice(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.size), slice(self.x0, self.x0 + self.size)

    def pixel_slice(self, factor: int) -> tuple[slice, slice]:
        """The matching crop of the (upsampled, padded) pixel image; `factor` is the autoencoder downsample."""
        return (slice(factor * self.y0, factor * (self.y0 + self.size)),
                slice(factor * self.x0, factor * (self.x0 + self.size)))


@dataclass(frozen=True)
class TileGrid:
    size: int          # lt, tile side in latents
    overlap: int       # ov, in latents
    tiles: tuple[Tile, ...]

    @property
    def stride(self) -> int:
        return self.size - self.overlap


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """0, stride, 2*stride, ... while the tile fits; L - size appended when the last tile falls short of the edge."""
    if size > length:
        raise ValueError(f"tile size {size} exceeds the length {length}")
    if stride < 1:
        raise ValueError(f"tile stride must be >= 1, got {stride}")
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def tile_size_latents(tile_px: int, factor: int, multiple: int = 2) -> int:
    """lt = max(floor(T / f / m) * m, m): the reference's max(floor(T/8/2)*2, 2) for f = 8 and patch m = 2."""
    return max((tile_px // factor // multiple) * multiple, multiple)


def tile_grid(latent_h: int, latent_w: int, tile_px: int, overlap_px: int, factor: int,
              multiple: int = 2) -> TileGrid:
    """Tile geometry of docs/method.md s8, generalised from f = 8 to the autoencoder's downsample `factor`.

    lt = max(floor(T/f/m)*m, m), then min(lt, lh, lw) (the latent sizes are multiples of m after padding);
    ov = max(overlap // f, lt // 8), capped at lt // 2: a larger overlap only multiplies the tiles (the stride
    falls to one latent at lt - 1) without blending any wider. With T = 512, f = 8: lt = 64, ov = 8 latents.
    """
    lt, ov = tile_geometry(latent_h, latent_w, tile_px, overlap_px, factor, multiple)
    stride = lt - ov
    tiles = tuple(Tile(y, x, lt) for y in tile_starts(latent_h, lt, stride)
                  for x in tile_starts(latent_w, lt, stride))
    return TileGrid(lt, ov, tiles)


def tile_geometry(latent_h: int, latent_w: int, tile_px: int, overlap_px: int, factor: int,
                  multiple: int = 2) -> tuple[int, int]:
    """(lt, ov) of `tile_grid`, without building the tiles."""
    if tile_px <= 0:
        raise ValueError("tile_px must be > 0 for tiling")
    lt = min(tile_size_latents(tile_px, factor, multiple), latent_h, latent_w)
    if lt % multiple:
        raise ValueError(f"tile side {lt} latents is not a multiple of the patch size {multiple}; pad the latent "
                         f"grid ({latent_h}x{latent_w}) to a multiple of {multiple} first")
    return lt, min(max(overlap_px // factor, lt // 8), lt // 2)


def tile_count(latent_h: int, latent_w: int, tile_px: int, overlap_px: int, factor: int,
               multiple: int = 2) -> tuple[int, int]:
    """(number of tiles, tile side in latents) of `tile_grid`, counted without building the tiles."""
    lt, ov = tile_geometry(latent_h, latent_w, tile_px, overlap_px, factor, multiple)
    n = len(tile_starts(latent_h, lt, lt - ov)) * len(tile_starts(latent_w, lt, lt - ov))
    return n, lt


def gaussian_weights(size: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Separable [size, size] blend weights, peak 1 at the centre, about 5e-6 at an edge (docs/method.md s8)."""
    i = torch.arange(size, dtype=torch.float64)
    w = torch.exp(-(((i - (size - 1) / 2) / size) ** 2) / (2 * GAUSSIAN_VAR))
    return torch.outer(w, w).to(dtype=dtype, device=device)


class TiledVelocity:
    """A whole-image velocity function built from per-tile velocity functions, blended at every call.

    `make_fn(lq_tiles [n*B, C, lt, lt], sem_tiles [n*B, N, D]) -> velocity_fn(z, t, t_next)` builds the model's
    velocity function for a stack of tiles (e.g. `vosr.flow.multistep_velocity_fn` bound to model and options);
    tiles are processed `tile_batch` at a time. `sem_tiles` holds one [B, N, D] tensor per tile, encoded once
    from the matching pixel crop before sampling starts (docs/method.md s8).
    """

    def __init__(self, make_fn: Callable[[torch.Tensor, torch.Tensor], VelocityFn], lq: torch.Tensor,
                 sem_tiles: Sequence[torch.Tensor], grid: TileGrid, tile_batch: int = 4):
        if len(sem_tiles) != len(grid.tiles):
            raise ValueError(f"{len(sem_tiles)} semantic token sets for {len(grid.tiles)} tiles")
        if tile_batch < 1:
            raise ValueError("tile_batch must be >= 1")
        self.grid = grid
        self.batch = lq.shape[0]
        self.shape = tuple(lq.shape)
        weight = gaussian_weights(grid.size, dtype=lq.dtype, device=lq.device)
        self.weight = weight
        norm = torch.zeros(lq.shape[-2:], dtype=lq.dtype, device=lq.device)
        for t in grid.tiles:
            ys, xs = t.latent_slice()
            norm[ys, xs] += weight
        self.norm = norm
        self.chunks: list[tuple[list[Tile], VelocityFn]] = []
        for start in range(0, len(grid.tiles), tile_batch):
            tiles = list(grid.tiles[start:start + tile_batch])
            lq_stack = torch.cat([lq[(..., *t.latent_slice())] for t in tiles], dim=0)
            sem_stack = torch.cat(list(sem_tiles[start:start + tile_batch]), dim=0)
            self.chunks.append((tiles, make_fn(lq_stack, sem_stack)))

    def __call__(self, z: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        if tuple(z.shape) != self.shape:
            raise ValueError(f"latent shape {tuple(z.shape)} differs from the LR latent {self.shape}")
        acc = torch.zeros_like(z)
        b = self.batch
        for tiles, fn in self.chunks:
            z_stack = torch.cat([z[(..., *tile.latent_slice())] for tile in tiles], dim=0)
            v = fn(z_stack, t, t_next)
            for k, tile in enumerate(tiles):
                ys, xs = tile.latent_slice()
                acc[:, :, ys, xs] += v[k * b:(k + 1) * b] * self.weight
        return acc / self.norm


def pad_amount(size: int, multiple: int) -> int:
    return (-size) % multiple


def reflect_pad(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad [B, C, H, W] at the bottom/right to multiples of `multiple` by reflection (docs/method.md s0).

    Reflection needs the pad to be smaller than the side, so a very small image is reflected repeatedly.
    Returns the padded tensor and the original (H, W) to crop back to.
    """
    h, w = x.shape[-2:]
    ph, pw = pad_amount(h, multiple), pad_amount(w, multiple)
    out = x
    while ph or pw:
        ch, cw = out.shape[-2:]
        sh, sw = min(ph, ch - 1), min(pw, cw - 1)
        if sh == 0 and sw == 0:  # a 1-pixel side cannot reflect; repeat the edge
            out = torch.nn.functional.pad(out, (0, pw, 0, ph), mode="replicate")
            break
        out = torch.nn.functional.pad(out, (0, sw, 0, sh), mode="reflect")
        ph, pw = ph - sh, pw - sw
    return out, (h, w)


def ceil_to(size: int, multiple: int) -> int:
    return int(math.ceil(size / multiple) * multiple)
