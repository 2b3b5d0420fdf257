"""Scalar draws from a torch.Generator (every random choice of a sample comes from its own generator)."""

from __future__ import annotations

import torch


def uniform(g: torch.Generator, lo: float, hi: float) -> float:
    u = torch.rand((), generator=g, dtype=torch.float64).item()
    return float(lo + (hi - lo) * u)


def randint(g: torch.Generator, n: int) -> int:
    """Uniform integer in [0, n)."""
    return int(torch.randint(0, n, (1,), generator=g).item())


def choice(g: torch.Generator, probs: list[float]) -> int:
    """Index drawn with the given probabilities (inverse CDF of one uniform)."""
    u = uniform(g, 0.0, 1.0)
    acc = 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc:
            return i
    return max(i for i, p in enumerate(probs) if p > 0)
