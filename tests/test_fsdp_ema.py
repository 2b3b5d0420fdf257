"""training/fsdp.ShardedEMA: on a 2-process gloo group without Ray, the EMA kept as
local shards and updated with torch._foreach ops gives, once gathered, exactly the EMA that gathers every
parameter every step (update_ema below), also for parameters whose first dimension does not split evenly."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

import training.fsdp  # noqa: F401  (imported before the fork, with torch.distributed)
import vosr.ema  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def update_ema(ema, model) -> None:
    """The reference: a vosr.ema.EMA step from a sharded model that gathers every parameter (every rank keeps a full
    EMA copy), the per-step communication ShardedEMA avoids."""
    src = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
           for name, p in model.named_parameters()}
    for name, p_ema in ema.module.named_parameters():
        p_ema.lerp_(src[name].to(p_ema.device, p_ema.dtype), 1.0 - ema.decay)
    ema.num_updates += 1


def _worker(rank: int, world: int, rdzv: str, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist
    from torch import nn

    from training.fsdp import ShardedEMA, shard
    from vosr.ema import EMA

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))  # 5 and 3 rows: uneven over 2 ranks
        ema_ref = EMA(model, 0.7)
        ema = EMA(model, 0.7)
        shard(model)
        sharded = ShardedEMA(ema, model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            model(torch.randn(4, 6, generator=g)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
            update_ema(ema_ref, model)  # the per-step all-gather
            sharded.update()  # local shards only
        sharded.gather_into(ema)
        if rank == 0:
            torch.save({"ref": copy.deepcopy(ema_ref.module.state_dict()), "got": ema.module.state_dict(),
                        "n": (ema_ref.num_updates, ema.num_updates),
                        "local": [tuple(s.shape) for s in sharded.shards]}, out)
    finally:
        dist.destroy_process_group()


def test_sharded_ema_matches_the_gathering_ema(tmp_path):
    out = tmp_path / "ema.pt"
    # fork: the children inherit the imported torch (a spawn re-imports it, ~30 s on a loaded 2-core machine)
    mp.start_processes(_worker, args=(2, f"file://{tmp_path / 'rdzv'}", str(out)), nprocs=2, join=True,
                       start_method="fork")
    res = torch.load(out, weights_only=True)
    assert res["n"] == (3, 3)
    assert res["local"][0] == (3, 6) and res["local"][2] == (2, 5)  # rank 0 holds a shard, not the whole
    for k, v in res["ref"].items():
        torch.testing.assert_close(res["got"][k], v, rtol=0, atol=1e-7)
