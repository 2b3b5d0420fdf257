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
    """vosr.ema.EMA step from a sharded model, gathering each parameter (every rank keeps a full EMA copy).
    Kept for reference and tests; the training loop uses ShardedEMA, which does not communicate per step."""
    src = {name: _full(p.detach()) for name, p in model.named_parameters()}
    for name, p_ema in ema.module.named_parameters():
        p_ema.lerp_(src[name].to(p_ema.device, p_ema.dtype), 1.0 - ema.decay)
    ema.num_updates += 1


class ShardedEMA:
    """The EMA of a fully_shard-ed model kept as each rank's local shards, updated every optimiser step with one
    torch._foreach_lerp_ over the local shards (no communication: the same p_ema <- d p_ema + (1 - d) p per
    element as vosr.ema.EMA). `gather_into(ema)` all-gathers it into a full vosr.ema.EMA module only when it is
    needed (checkpoint export, validation); that is a collective."""

    def __init__(self, ema, model: nn.Module):
        from torch.distributed.tensor import DTensor, distribute_tensor

        self.decay = ema.decay
        self.names: list[str] = []
        self.params: list[Any] = []
        self.shards: list[torch.Tensor] = []
        full = dict(ema.module.named_parameters())
        for name, p in model.named_parameters():
            self.names.append(name)
            self.params.append(p)
            src = full[name].detach().to(p.device, p.dtype)
            if isinstance(p, DTensor):  # this rank's slice of the (full, identical on every rank) EMA weights
                local = distribute_tensor(src, p.device_mesh, p.placements, src_data_rank=None).to_local()
            else:
                local = src
            self.shards.append(local.clone())
        self.num_updates = ema.num_updates

    @staticmethod
    def _local(p) -> torch.Tensor:
        return p.detach().to_local() if hasattr(p, "to_local") else p.detach()

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shards, [self._local(p) for p in self.params], 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def gather_into(self, ema) -> None:
        """Collective: the full EMA weights into `ema.module` on every rank (one parameter at a time)."""
        from torch.distributed.tensor import DTensor

        target = dict(ema.module.named_parameters())
        for name, p, shard in zip(self.names, self.params, self.shards):
            if isinstance(p, DTensor):
                full = DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape,
                                          stride=p.stride()).full_tensor()
            else:
                full = shard
            target[name].copy_(full.to(target[name].device, target[name].dtype))
        ema.num_updates = self.num_updates


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
