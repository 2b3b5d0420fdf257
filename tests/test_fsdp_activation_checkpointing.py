"""train.activation_checkpointing under train.strategy=fsdp: the checkpointed blocks are the FSDP2 units
(training/fsdp.shard wraps each block), so the recomputation in backward all-gathers the block again. On a
2-process gloo group without Ray, the gathered gradients of a checkpointed and an un-checkpointed step are equal."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

import training.fsdp  # noqa: F401  (imported before the fork, with torch.distributed)
import vosr.model  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def _worker(rank: int, world: int, rdzv: str, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist

    from jobkit.config import config_from_dict
    from training.fsdp import shard
    from vosr.flow import training_loss
    from vosr.model import build_dit, model_dims, set_activation_checkpointing
    from vosr.seeding import generator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=world)
    try:
        cfg = config_from_dict({}, ["model.depth=3"])
        d = model_dims(cfg)
        grads = {}
        for every in (0, 1, 2):
            torch.manual_seed(0)
            model = build_dit(cfg)
            with torch.no_grad():
                model.final_layer.linear.weight.normal_(0, 0.05)
            set_activation_checkpointing(model, every)
            shard(model)
            g = torch.Generator().manual_seed(rank)
            hq = torch.randn(2, d["latent_channels"], 16, 16, generator=g)
            sem = torch.randn(2, d["sem_tokens"], d["sem_dim"], generator=g)
            loss, _ = training_loss(model, hq, torch.randn(hq.shape, generator=g), sem, cfg.flow, generator(rank))
            loss.backward()
            grads[every] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


def test_fsdp_checkpointed_gradients_equal_the_plain_step(tmp_path):
    out = tmp_path / "grads.pt"
    # fork: the children inherit the imported torch (a spawn re-imports it, ~30 s on a loaded 2-core machine)
    mp.start_processes(_worker, args=(2, f"file://{tmp_path / 'rdzv'}", str(out)), nprocs=2, join=True,
                       start_method="fork")
    grads = torch.load(out, weights_only=True)
    assert grads[0]["blocks.0.attn.qkv.weight"].abs().sum() > 0
    for every in (1, 2):
        for name, ref in grads[0].items():
            torch.testing.assert_close(grads[every][name], ref, rtol=0, atol=1e-7, msg=f"{every} {name}")
