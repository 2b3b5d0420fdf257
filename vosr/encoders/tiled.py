"""Tiled autoencoder passes for images too large to encode or decode in one piece.

The image (or latent) is cut into overlapping square tiles on a regular grid (the last tile of a row or column is
moved back to end at the edge, so it may overlap more); every tile is encoded/decoded on its own and the results
are blended with separable linear ramps over the overlap: a tile's weight rises from ~0 to 1 across its leading
overlap and falls across its trailing one (not at the image border). The blend is normalised by the sum of the
weights, which for a grid of tiles is the product of one sum per axis, so no full-size weight map is kept. The
output is accumulated in place into one full-size tensor: the working memory is that of one tile, plus the output.

Encoding blends the posterior *moments* (mean and log-variance) of the tiles and draws one sample for the whole
latent, so the noise of the posterior sample does not depend on the tiling (as diffusers' AutoencoderKL tiling
blends moments too). Tiles are seen in isolation: the group norms and the VAE's mid-block attention see one tile
only, so a tiled result differs slightly from the whole-image one, most near tile edges; `seam_report` measures
that difference on and off the tile boundaries (benchmarks/bench_vae_tiling.py prints it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

OVERLAP_FRACTION = 0.25     # overlap = a quarter of the tile, the fraction diffusers' AutoencoderKL tiling uses


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` with at least `overlap` between neighbours covering [0, length)."""
    if tile >= length:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def ramp(start: int, size: int, length: int, overlap: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """1-D blend weights of one tile: linear (i + 0.5) / overlap over the first and last `overlap` samples, 1
    inside; no ramp on a side that touches the image border."""
    w = torch.ones(size, dtype=dtype, device=device)
    if overlap <= 0:
        return w
    n = min(overlap, size // 2)
    up = (torch.arange(n, dtype=dtype, device=device) + 0.5) / n
    if start > 0:
        w[:n] = up
    if start + size < length:
        w[size - n:] = torch.minimum(w[size - n:], up.flip(0))
    return w


def axis_weights(length: int, tile: int, overlap: int, scale: int = 1, dtype=torch.float32, device=None):
    """(starts in input units, per-tile ramps in output units, their sum) along one axis; the output is the input
    times `scale` (decode: the autoencoder factor; encode: 1 / factor, given as scale=1 on the latent side)."""
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length) * scale
    ramps = [ramp(s * scale, size, length * scale, overlap * scale, dtype, device) for s in starts]
    total = torch.zeros(length * scale, dtype=dtype, device=device)
    for s, r in zip(starts, ramps):
        total[s * scale:s * scale + size] += r
    return starts, ramps, total


def blend_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
                scale_num: int, scale_den: int, out_channels: int) -> torch.Tensor:
    """Apply `fn` (input tile [B, C, t, t] -> output tile [B, out_channels, t*num/den, t*num/den]) tile by tile
    over `x` and blend the outputs. `tile` and `overlap` are in input samples and multiples of `scale_den`."""
    b, _, h, w = x.shape
    oh, ow = h * scale_num // scale_den, w * scale_num // scale_den
    otile, oover = tile * scale_num // scale_den, overlap * scale_num // scale_den
    ys, ry, ty = axis_weights(oh, otile, oover, device=x.device)
    xs, rx, tx = axis_weights(ow, otile, oover, device=x.device)
    out = None
    for y0, wy in zip(ys, ry):
        for x0, wx in zip(xs, rx):
            iy, ix = y0 * scale_den // scale_num, x0 * scale_den // scale_num
            piece = fn(x[:, :, iy:iy + min(tile, h), ix:ix + min(tile, w)]).float()
            if out is None:
                out = torch.zeros(b, out_channels, oh, ow, dtype=torch.float32, device=piece.device)
            piece.mul_(wy.to(piece.device)[:, None] * wx.to(piece.device)[None, :])
            out[:, :, y0:y0 + piece.shape[-2], x0:x0 + piece.shape[-1]] += piece
            del piece
    out.div_(ty.to(out.device)[:, None] * tx.to(out.device)[None, :])
    return out


def tile_geometry(size_px: int, factor: int) -> tuple[int, int]:
    """(tile, overlap) in pixels, both multiples of the autoencoder factor: the tile rounded down to a multiple of
    4 * factor (at least that), the overlap a quarter of it."""
    unit = 4 * factor
    tile = max(unit, size_px // unit * unit)
    return tile, max(factor, int(tile * OVERLAP_FRACTION) // factor * factor)


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile_px: int,
                 factor: int) -> torch.Tensor:
    """decode(z) of a large latent, `tile_px` pixel tiles at a time (see the module docstring)."""
    tile, overlap = tile_geometry(tile_px, factor)
    return blend_tiles(decode, z, tile // factor, overlap // factor, factor, 1, 3)


def moments_tiled(moments: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_px: int, factor: int,
                  channels: int) -> torch.Tensor:
    """moments(x) ([B, channels, H/f, W/f]) of a large image, `tile_px` pixel tiles at a time."""
    tile, overlap = tile_geometry(tile_px, factor)
    return blend_tiles(moments, x, tile, overlap, 1, factor, channels)


def seam_report(tiled: torch.Tensor, whole: torch.Tensor, tile_px: int, factor: int, band: int = 4) -> dict:
    """How a tiled decode differs from the whole-image one, on the blend regions between tiles (the seams, and
    `band` px either side) and elsewhere: mean absolute error and PSNR (images in [-1, 1] -> a 2.0 peak) of each,
    and their ratio (1.0 = tile boundaries are no worse than anywhere else)."""
    tile, overlap = tile_geometry(tile_px, factor)
    h, w = whole.shape[-2:]
    mask = torch.zeros(h, w, dtype=torch.bool)
    for length, axis in ((h, 0), (w, 1)):
        starts = tile_starts(length, tile, overlap)
        for s in starts[1:]:
            lo, hi = max(0, s - band), min(length, s + overlap + band)   # the blend region of this seam
            if axis == 0:
                mask[lo:hi, :] = True
            else:
                mask[:, lo:hi] = True
    err = (tiled.float() - whole.float()).abs().mean(dim=(0, 1)).cpu()

    def stats(sel: torch.Tensor) -> dict:
        if not bool(sel.any()):
            return {"mae": 0.0, "psnr_db": float("inf"), "pixels": 0}
        e = err[sel]
        mse = float((e ** 2).mean())
        psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()
        return {"mae": round(float(e.mean()), 6), "psnr_db": round(psnr, 2), "pixels": int(sel.sum())}

    seams, rest = stats(mask), stats(~mask)
    ratio = seams["mae"] / rest["mae"] if rest["mae"] > 0 else float("inf") if seams["mae"] > 0 else 1.0
    return {"tile_px": tile, "overlap_px": overlap, "seams": seams, "elsewhere": rest,
            "seam_to_elsewhere_mae": round(ratio, 3)}
