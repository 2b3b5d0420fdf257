"""FSDP2 (torch.distributed.fsdp.fully_shard) for train.strategy=fsdp: the large presets' parameters, gradients and
optimizer moments are sharded across the Ray Train workers.

Checkpoints are sharded too (`save_sharded` / `load_sharded`, torch.distributed.checkpoint): every rank writes its
own shards of the model, the AdamW moments and the EMA (ShardedEMA's local shards, as DTensors); no rank gathers
the full state. DCP reshards on load, so a run of another world size (FSDP, DDP or one worker) resumes it, and
vosr/sharded.py reads or exports its weights without a process group. `full_state` / `load_optimizer` are the
earlier unsharded format (full weights, full name-keyed optimizer state on rank 0), still read on resume.

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

    def dtensors(self) -> dict[str, torch.Tensor]:
        """{name: this rank's shard as a DTensor of the parameter's full shape} (views, no copy), for DCP."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name, p, shard in zip(self.names, self.params, self.shards):
            out[name] = (DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                            run_check=False) if isinstance(p, DTensor) else shard)
        return out

    @torch.no_grad()
    def load_dtensors(self, state: dict[str, torch.Tensor]) -> None:
        for name, shard in zip(self.names, self.shards):
            t = state[name]
            shard.copy_(t.to_local() if hasattr(t, "to_local") else t)


def sharded_state(model: nn.Module, opt: torch.optim.Optimizer, ema) -> dict[str, Any]:
    """The DCP state of a run: {"model", "optim" (keyed by parameter name), "ema"}, every tensor this rank's
    shard (a DTensor) under FSDP, a plain tensor otherwise. `ema`: ShardedEMA or vosr.ema.EMA. No copies."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    ema_state = ema.dtensors() if isinstance(ema, ShardedEMA) else dict(ema.module.named_parameters())
    return {"model": msd, "optim": osd, "ema": ema_state}


def save_sharded(model: nn.Module, opt: torch.optim.Optimizer, ema, path: str) -> None:
    """Collective: each rank writes its shards to `path` (`__<rank>_0.distcp`; rank 0 also `.metadata`). The
    ranks' paths may differ (each its own local folder; Ray Train merges the uploads into one checkpoint)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(model, opt, ema), storage_writer=dcp.FileSystemWriter(path))


@torch.no_grad()
def load_sharded(model: nn.Module, opt: torch.optim.Optimizer, ema, storage_reader) -> None:
    """Collective (when a process group exists): load a sharded checkpoint saved under any world size into this
    run's model, optimizer and EMA, each rank reading only the pieces of its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from vosr.sharded import quiet_no_dist

    state = sharded_state(model, opt, ema)
    with quiet_no_dist():
        dcp.load(state, storage_reader=storage_reader, no_dist=not torch.distributed.is_initialized())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if isinstance(ema, ShardedEMA):
        ema.load_dtensors(state["ema"])
    else:
        for name, p in ema.module.named_parameters():
            p.copy_(state["ema"][name])


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
