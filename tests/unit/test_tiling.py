"""Tile geometry, blend weights and the blended velocity wrapper (docs/method.md s8)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vosr import flow
from vosr.tiling import (
    TiledVelocity,
    gaussian_weights,
    reflect_pad,
    tile_grid,
    tile_starts,
)


def covers(grid, latent_h: int, latent_w: int) -> bool:
    """True when every latent position lies in at least one tile."""
    hit = torch.zeros(latent_h, latent_w, dtype=torch.bool)
    for t in grid.tiles:
        ys, xs = t.latent_slice()
        hit[ys, xs] = True
    return bool(hit.all())


def test_tile_starts_append_the_edge_tile():
    assert tile_starts(10, 4, 3) == [0, 3, 6]          # 6 + 4 reaches the edge exactly
    assert tile_starts(11, 4, 3) == [0, 3, 6, 7]       # last tile falls short: L - lt appended
    assert tile_starts(4, 4, 3) == [0]
    with pytest.raises(ValueError):
        tile_starts(3, 4, 3)


def test_reference_geometry_at_512px():
    # docs/method.md s8: T = 512 at f = 8 gives lt = 64 latents and ov = 8 (the lt // 8 floor dominates 4 px or 32 px)
    for overlap_px in (4, 32):
        g = tile_grid(128, 160, 512, overlap_px, factor=8)
        assert (g.size, g.overlap, g.stride) == (64, 8, 56)
    assert tile_grid(128, 128, 512, 256, factor=8).overlap == 32
    # lt is clipped to the image, ov capped at half a tile (a larger one only multiplies the tiles)
    g = tile_grid(20, 36, 512, 4000, factor=8)
    assert g.size == 20 and g.overlap == 10 and g.stride == 10
    # generalised to another downsample: T = 64 px at f = 4 -> 16 latents
    assert tile_grid(40, 40, 64, 0, factor=4).size == 16


@pytest.mark.parametrize("lh,lw,tile,ov", [(30, 46, 64, 0), (64, 64, 64, 16), (22, 86, 40, 8), (8, 8, 64, 0)])
def test_tiles_cover_and_stay_inside(lh, lw, tile, ov):
    g = tile_grid(lh, lw, tile, ov, factor=4)
    assert covers(g, lh, lw)
    for t in g.tiles:
        assert 0 <= t.y0 and t.y0 + t.size <= lh and 0 <= t.x0 and t.x0 + t.size <= lw
        assert t.size % 2 == 0


def test_gaussian_weights_shape_and_edges():
    w = gaussian_weights(64)
    assert w.shape == (64, 64)
    # sigma = 0.1 lt: the edge weighs ~5e-6 of the centre (docs/method.md s8)
    edge = math.exp(-((31.5 / 64) ** 2) / 0.02)
    assert w[0, 32].item() == pytest.approx(edge * w[31, 32].item() / math.exp(-((0.5 / 64) ** 2) / 0.02),
                                            rel=1e-5)
    assert 1e-6 < w[0, 32].item() < 1e-5
    assert torch.allclose(w, w.T) and torch.allclose(w, w.flip(0))
    assert w.max().item() <= 1.0


def _pointwise_velocity(lq, sem):
    bias = sem.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    def fn(z, t, t_next):
        return 0.7 * z - (1 + t) * lq + bias

    return fn


def test_pointwise_field_is_reproduced_exactly():
    """For a velocity with no spatial context the blend must equal the untiled result at every position."""
    g = torch.Generator().manual_seed(0)
    lq = torch.randn(2, 3, 26, 38, generator=g)
    noise = torch.randn(lq.shape, generator=g)
    sem = torch.full((2, 5, 4), 0.25)
    ts = flow.timesteps(6)
    full = flow.euler_sample(_pointwise_velocity(lq, sem), noise, ts)
    grid = tile_grid(26, 38, 48, 8, factor=4)       # 12-latent tiles, several per axis, ragged edges
    assert len(grid.tiles) > 4
    tiled = TiledVelocity(_pointwise_velocity, lq, [sem] * len(grid.tiles), grid, tile_batch=3)
    out = flow.euler_sample(tiled, noise, ts)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def _conv_velocity(lq, sem):
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16

    def fn(z, t, t_next):
        c = z.shape[1]
        blur = F.conv2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3).contiguous(), groups=c)
        return 0.5 * blur - lq

    return fn


def test_local_field_agrees_closely_with_overlap():
    """A 3x3 field sees tile borders; with overlap the Gaussian weights keep those borders out of the blend."""
    g = torch.Generator().manual_seed(1)
    lq = torch.randn(1, 4, 40, 52, generator=g)
    noise = torch.randn(lq.shape, generator=g)
    ts = flow.timesteps(5)
    sem = torch.zeros(1, 3, 2)
    full = flow.euler_sample(_conv_velocity(lq, sem), noise, ts)
    grid = tile_grid(40, 52, 80, 40, factor=4)      # 20-latent tiles, 10 latents of overlap
    tiled = flow.euler_sample(TiledVelocity(_conv_velocity, lq, [sem] * len(grid.tiles), grid), noise, ts)
    err = (tiled - full).abs()
    assert err.max().item() < 2e-3 * full.abs().max().item()
    # without overlap (ov = lt // 8 = 2) the seams show much more: the test above is not trivially true
    grid0 = tile_grid(40, 52, 80, 0, factor=4)
    seams = flow.euler_sample(TiledVelocity(_conv_velocity, lq, [sem] * len(grid0.tiles), grid0), noise, ts)
    assert (seams - full).abs().max().item() > 5 * err.max().item()


def test_tiled_velocity_rejects_mismatches():
    lq = torch.zeros(1, 3, 16, 16)
    grid = tile_grid(16, 16, 32, 0, factor=4)
    with pytest.raises(ValueError):
        TiledVelocity(_pointwise_velocity, lq, [torch.zeros(1, 2, 2)], grid)
    tv = TiledVelocity(_pointwise_velocity, lq, [torch.zeros(1, 2, 2)] * len(grid.tiles), grid)
    with pytest.raises(ValueError):
        tv(torch.zeros(1, 3, 16, 18), 1.0, 0.0)


@pytest.mark.parametrize("h,w", [(37, 23), (1, 9), (16, 16), (3, 2)])
def test_reflect_pad_to_multiple(h, w):
    x = torch.rand(1, 3, h, w)
    y, size = reflect_pad(x, 8)
    assert size == (h, w)
    assert y.shape[-2] % 8 == 0 and y.shape[-1] % 8 == 0
    assert y.shape[-2] - h < 8 and y.shape[-1] - w < 8
    torch.testing.assert_close(y[..., :h, :w], x)
    if h > 1 and y.shape[-2] > h:
        torch.testing.assert_close(y[..., h, :w], x[..., h - 2, :])   # reflected, not repeated
