"""2D rotary position embedding of the DiT (docs/method.md s4, EVA-style "fast" vision RoPE).

Half of a head's channels rotate with the row index, the other half with the column index. Per axis there are
head_dim/4 frequencies theta^(-2i / (head_dim/2)), each repeated for an adjacent (interleaved) channel pair, and
`rotate_half` pairs adjacent channels. Positions are the integers 0..G-1 on the training grid G; on any other
grid size n (per axis, so non-square grids work) they are interpolated, arange(n)/n*G (docs/method.md s0/s4: the
reference's flexible forward), so one checkpoint serves every size. Nothing is stored in the state dict: the
tables are recomputed from (grid, training grid), so a checkpoint can be reloaded for another training grid.

Two arithmetics build the same tables: "float64" (default: angles in float64, rounded once to float32) and
"float32", the released VOSR models' own (docs/method.md s4: frequencies, positions arange(n)/n*G and angles all in
float32, positions divided first, at the training grid too). They differ by float32 rounding (about 1e-6 in a
forward); a model imported from the authors' release uses "float32", which reproduces the tables stored in its
weights file bit for bit (vosr/released.py checks that on import).
"""

from __future__ import annotations

import torch

ARITHMETICS = ("float64", "float32")


def axis_positions(n: int, train_len: int) -> torch.Tensor:
    """Integer positions at the training length, interpolated positions arange(n)/n*G elsewhere (float64)."""
    if n == train_len:
        return torch.arange(n, dtype=torch.float64)
    return torch.arange(n, dtype=torch.float64) / n * train_len


def axis_frequencies(axis_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """axis_dim/2 frequencies theta^(-2i/axis_dim) (16 for a 64-channel head: axis_dim 32)."""
    return 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)


def axis_angles_float32(n: int, train_len: int, axis_dim: int, theta: float) -> torch.Tensor:
    """[n, axis_dim] angles in the released models' float32 arithmetic: freqs 1 / theta^(arange(0, d, 2) / d) and
    positions (arange(n) / n) * G, each op in float32, then one float32 product per angle."""
    freqs = 1.0 / (theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim))
    pos = torch.arange(n, dtype=torch.float32) / n * train_len
    return (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)


def rope_tables(h: int, w: int, head_dim: int, train_grid: tuple[int, int], theta: float = 10000.0,
                device: torch.device | str = "cpu", arithmetic: str = "float64") -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [h*w, head_dim] for a row-major token grid of h x w (`arithmetic`: see the module doc)."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"unknown RoPE arithmetic {arithmetic!r}; known: {', '.join(ARITHMETICS)}")
    axis_dim = head_dim // 2
    if arithmetic == "float32":
        ang_r = axis_angles_float32(h, train_grid[0], axis_dim, theta)
        ang_c = axis_angles_float32(w, train_grid[1], axis_dim, theta)
    else:
        freqs = axis_frequencies(axis_dim, theta)
        ang_r = (axis_positions(h, train_grid[0])[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # [h, d]
        ang_c = (axis_positions(w, train_grid[1])[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # [w, d]
    ang = torch.cat([ang_r[:, None, :].expand(h, w, axis_dim), ang_c[None, :, :].expand(h, w, axis_dim)], dim=-1)
    ang = ang.reshape(h * w, head_dim)
    return ang.cos().float().to(device), ang.sin().float().to(device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): adjacent channels form the rotated pairs."""
    pairs = x.unflatten(-1, (-1, 2))
    x1, x2 = pairs.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., N, head_dim] by the tables [N, head_dim] (computed in float32)."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
