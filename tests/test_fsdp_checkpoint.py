"""Sharded FSDP checkpoints (training/fsdp.save_sharded / load_sharded, vosr/sharded.py) on
2-3 process gloo groups without Ray.

Two ranks train a small model under FSDP2 for a few AdamW steps and save with torch.distributed.checkpoint, each
rank into its own folder (as on separate nodes; the folders are then merged as Ray Train's uploads merge them).
The saved model, EMA and optimizer state must come back equal when three FSDP ranks resume it (resharded, with
the rows of every tensor split unevenly), when one process without a process group resumes it into a plain
model, and when the weights are read or exported without any process group (vosr/sharded.py, training/export.py).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import training.fsdp  # noqa: F401  (imported before the fork, with torch.distributed)
import vosr.ema  # noqa: F401
from tests.helpers.s3_fixture import s3  # noqa: F401 - pytest fixture

ROOT = Path(__file__).resolve().parents[1]


class Net(torch.nn.Module):
    """Blocks sharded one by one as training/fsdp.shard does for the DiT; 5, 7 and 3 rows split unevenly."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(4, 7)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(7, 7), torch.nn.Linear(7, 5)])
        self.out = torch.nn.Linear(5, 3)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.out(x)


def _setup(rank: int, world: int, rdzv: str, seed: int):
    import torch.distributed as dist

    from training.fsdp import ShardedEMA, shard
    from vosr.ema import EMA

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=world)
    torch.manual_seed(seed)
    model = Net()
    ema = EMA(model, 0.5)
    shard(model)
    sharded = ShardedEMA(ema, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    return model, ema, sharded, opt


def _full(model, opt, sharded, ema) -> dict:
    """Every rank: the gathered state (collectives); rank 0 returns it."""
    import copy

    from training.fsdp import full_state

    msd, osd = full_state(model, opt)
    sharded.gather_into(ema)
    return {"model": copy.deepcopy(msd), "optim": copy.deepcopy(osd), "ema": copy.deepcopy(ema.module.state_dict())}


def _save_worker(rank: int, world: int, rdzv: str, root: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist

    from training.fsdp import save_sharded

    model, ema, sharded, opt = _setup(rank, world, rdzv, seed=0)
    try:
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            model(torch.randn(6, 4, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            sharded.update()
        save_sharded(model, opt, sharded, f"{root}/rank{rank}/dcp")  # each rank its own (node-local) folder
        ref = _full(model, opt, sharded, ema)
        if rank == 0:
            torch.save(ref, f"{root}/ref.pt")
    finally:
        dist.destroy_process_group()


def _load_worker(rank: int, world: int, rdzv: str, root: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist

    from training.fsdp import ShardedEMA, load_optimizer, load_sharded, shard
    from vosr.ema import EMA
    from vosr.sharded import reader

    model, ema, sharded, opt = _setup(rank, world, rdzv, seed=1)  # other weights than the saved ones
    try:
        load_sharded(model, opt, sharded, reader(f"{root}/ckpt"))
        local = [tuple(s.shape) for s in sharded.shards]
        got = _full(model, opt, sharded, ema)
        # The earlier unsharded format (full weights + name-keyed optimizer_full) still resumes, as the loop does
        # it: weights loaded before sharding, the optimizer state after.
        ref = torch.load(f"{root}/ref.pt", weights_only=True)
        old = Net()
        old.load_state_dict(ref["model"])
        old_ema = EMA(old, 0.5)
        old_ema.load_state_dict(ref["ema"])
        shard(old)
        old_sharded = ShardedEMA(old_ema, old)
        old_opt = torch.optim.AdamW(old.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
        load_optimizer(old, old_opt, ref["optim"])
        got_old = _full(old, old_opt, old_sharded, old_ema)
        if rank == 0:
            torch.save({**got, "local": local, "old": got_old}, f"{root}/got{world}.pt")
    finally:
        dist.destroy_process_group()


def _assert_state_equal(got: dict, ref: dict) -> None:
    assert set(got["model"]) == set(ref["model"]) == set(ref["ema"]) == set(got["ema"])
    for k in ref["model"]:
        torch.testing.assert_close(got["model"][k], ref["model"][k], rtol=0, atol=0)
        torch.testing.assert_close(got["ema"][k], ref["ema"][k], rtol=0, atol=0)
    assert set(got["optim"]["state"]) == set(ref["optim"]["state"]) == set(ref["model"])
    for k, s in ref["optim"]["state"].items():
        for field in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got["optim"]["state"][k][field], s[field], rtol=0, atol=0)
    assert tuple(got["optim"]["param_groups"][0]["betas"]) == tuple(ref["optim"]["param_groups"][0]["betas"])


def _spawn(fn, world: int, tmp_path: Path, tag: str) -> None:
    # fork: the children inherit the imported torch (a spawn re-imports it, ~30 s on a loaded 2-core machine)
    mp.start_processes(fn, args=(world, f"file://{tmp_path / ('rdzv' + tag)}", str(tmp_path)), nprocs=world,
                       join=True, start_method="fork")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two FSDP ranks train 3 AdamW steps and save, each into its own folder; merged into ckpt/ as Ray does."""
    root = tmp_path_factory.mktemp("fsdp-ckpt")
    _spawn(_save_worker, 2, root, "save")
    (root / "ckpt").mkdir()
    for d in ("rank0", "rank1"):  # the merge Ray Train's per-rank uploads do
        shutil.copytree(root / d, root / "ckpt", dirs_exist_ok=True)
    return root, torch.load(root / "ref.pt", weights_only=True)


def test_sharded_checkpoint_resumes_at_other_world_sizes_and_exports(saved):
    from safetensors.torch import load_file

    from inference.model_uri import ModelNotFoundError, find_checkpoint
    from training.export import export_checkpoint
    from training.fsdp import load_sharded
    from vosr.ema import EMA
    from vosr.sharded import iter_tensors, reader

    tmp_path, ref = saved
    assert int(ref["optim"]["state"]["inp.weight"]["step"]) == 3
    assert not torch.equal(ref["ema"]["out.weight"], ref["model"]["out.weight"])  # the EMA lags the weights

    # Each rank wrote only its own shards: rank 1 has no metadata, and every weight, EMA and moment tensor is
    # stored as two row chunks (4 + 3 rows of 7), one in each rank's file.
    r0 = sorted(p.name for p in (tmp_path / "rank0/dcp").iterdir())
    r1 = sorted(p.name for p in (tmp_path / "rank1/dcp").iterdir())
    assert r0 == [".metadata", "__0_0.distcp"] and r1 == ["__1_0.distcp"], (r0, r1)
    md = reader(str(tmp_path / "rank0")).read_metadata()
    for key in ("model.inp.weight", "ema.inp.weight", "optim.state.inp.weight.exp_avg"):
        chunks = md.state_dict_metadata[key].chunks
        assert sorted(tuple(c.sizes) for c in chunks) == [(3, 4), (4, 4)], key
    files = {md.storage_data[idx].relative_path for idx in md.storage_data if idx.fqn == "model.inp.weight"}
    assert files == {"__0_0.distcp", "__1_0.distcp"}

    # 2 -> 3 FSDP ranks: resharded (7 rows -> 3/3/1), equal state.
    _spawn(_load_worker, 3, tmp_path, "load3")
    got3 = torch.load(tmp_path / "got3.pt", weights_only=True)
    assert got3["local"][0] == (3, 4)
    _assert_state_equal(got3, ref)
    _assert_state_equal(got3["old"], ref)

    # 2 -> 1 without a process group: a plain model, optimizer and vosr EMA.
    torch.manual_seed(1)
    model = Net()
    ema = EMA(model, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    load_sharded(model, opt, ema, reader(str(tmp_path / "ckpt")))
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _assert_state_equal({"model": model.state_dict(), "ema": ema.module.state_dict(),
                         "optim": get_optimizer_state_dict(model, opt)}, ref)

    # Weights without any process group, streamed a tensor at a time; and the one-file export.
    ema_read = dict(iter_tensors(str(tmp_path / "ckpt"), "ema", group_bytes=64))  # 8 tensors, several loads
    assert set(ema_read) == set(ref["ema"])
    for k, v in ref["ema"].items():
        assert torch.equal(ema_read[k], v), k
    out = tmp_path / "export"
    info = export_checkpoint(str(tmp_path / "ckpt"), str(out), weights_only=True)
    assert load_file(str(out / "model.safetensors")).keys() == ref["model"].keys()
    for k, v in load_file(str(out / "ema_model.safetensors")).items():
        assert torch.equal(v, ref["ema"][k]), k
    for k, v in load_file(str(out / "model.safetensors")).items():
        assert torch.equal(v, ref["model"][k]), k
    assert info["model_bytes"] == (out / "model.safetensors").stat().st_size
    with pytest.raises(ModelNotFoundError, match="training.export"):  # serving names the export command
        find_checkpoint(tmp_path / "ckpt")


def test_sharded_checkpoint_on_s3_resumes_and_exports(saved, s3):  # noqa: F811
    from safetensors.torch import load

    from training.export import export_checkpoint
    from training.fsdp import load_sharded
    from vosr.ema import EMA
    from vosr.sharded import reader

    root, ref = saved
    for f in (root / "ckpt").rglob("*"):
        if f.is_file():
            s3.put_file(f, f"run/checkpoint_00000003/{f.relative_to(root / 'ckpt').as_posix()}")
    src = s3.uri("run/checkpoint_00000003")
    torch.manual_seed(2)
    model = Net()
    ema = EMA(model, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_sharded(model, opt, ema, reader(src, s3.endpoint_url))  # byte ranges straight from S3, no download
    for k, v in ref["model"].items():
        assert torch.equal(model.state_dict()[k], v) and torch.equal(ema.module.state_dict()[k], ref["ema"][k]), k
    export_checkpoint(src, s3.uri("run/export"), s3.endpoint_url, weights_only=True)
    assert s3.keys("run/export/") == ["run/export/ema_model.safetensors", "run/export/model.safetensors"]
    got = load(s3.client.get_object(Bucket=s3.bucket, Key="run/export/ema_model.safetensors")["Body"].read())
    assert got.keys() == ref["ema"].keys() and all(torch.equal(got[k], ref["ema"][k]) for k in got)
