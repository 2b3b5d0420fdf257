"""Small helpers for tests on the method's models."""

from __future__ import annotations

import torch


def randomise(module: torch.nn.Module, seed: int, names=("final_layer",), std: float = 0.05) -> torch.nn.Module:
    """Give the zero-initialised parts named (by parameter-name prefix) seeded random values, so that the outputs
    depend on the whole network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if any(n.startswith(k) for k in names):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module
