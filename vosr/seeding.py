"""Deterministic per-sample random streams: seed = f(global seed, sample id, variant, purpose).

docs/method.md s0: every random draw of a sample (crop, degradation, noise) comes from its own generator, so a result
depends only on (global seed, id, variant), never on batch composition, worker count or rank.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (ints, strings); stable across processes, platforms and Python versions."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_seed(global_seed: int, sample_id: str, variant: int = 0, purpose: str = "degrade") -> int:
    return derive_seed(int(global_seed), str(sample_id), int(variant), purpose)


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def rank_seed(global_seed: int, rank: int, step: int = 0) -> int:
    """Seed of a training rank's own stream (docs/method.md s0: ranks never share a stream)."""
    return derive_seed(int(global_seed), "rank", int(rank), int(step))
