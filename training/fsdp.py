"""FSDP2 (torch.distributed.fsdp.fully_shard) for train.strategy=fsdp: the large presets' parameters, gradients and
optimizer moments are sharded across the Ray Train workers; checkpoints stay in the method library's unsharded
format (full model weights, full EMA copy, full optimizer state keyed by parameter name), so any number of
workers -- or a DDP run -- can read the weights, and an FSDP run of any size can resume the optimizer.

Every function here except `shard` is a collective: all ranks call it, in the same order.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


def shard(model: nn.Module) -> nn.Module:
    """Shard each transformer block, then the rest (embeddings, heads) as the root unit. In place."""
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)
    return model


@contextlib.contextmanager
def no_sync(model: nn.Module):
    """Gradient accumulation: skip the reduce-scatter on all but the last micro-step."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grad_norm_value(norm: torch.Tensor) -> float:
    return float(_full(norm))


@torch.no_grad()
def update_ema(ema, model: nn.Module) -> None:
    """vosr.ema.EMA step from a sharded model: every rank gathers each parameter and keeps a full EMA copy."""
    src = {name: _full(p.detach()) for name, p in model.named_parameters()}
    for name, p_ema in ema.module.named_parameters():
        p_ema.lerp_(src[name].to(p_ema.device, p_ema.dtype), 1.0 - ema.decay)
    ema.num_updates += 1


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state) unsharded and on CPU on rank 0 (empty dicts elsewhere); the optimizer
    state is keyed by parameter name (torch.distributed.checkpoint.state_dict)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, opt, options=_options(cpu_offload=True))


def load_optimizer(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full, name-keyed optimizer state (every rank holds it) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=_options())
