"""Rank-0 peak memory during an FSDP checkpoint: a full gather to rank 0 vs the sharded DCP checkpoint.

Two CPU processes over gloo (no Ray) shard a mid-size DiT with FSDP2 exactly as the training loop does
(training/fsdp.shard, AdamW with its moments initialised, ShardedEMA plus the loop's full EMA module), then write
one checkpoint the way each path of training/loop.py writes it:

  old: ShardedEMA.gather_into + fsdp.full_state (model and name-keyed optimizer gathered to rank 0, CPU) and
       rank 0 writing model/EMA safetensors and the full optimizer state (a full-state checkpoint);
  new: fsdp.save_sharded (every rank writes its own shards, torch.distributed.checkpoint) and rank 0 adding
       config.json, position/RNG and the manifest of every rank's files (training/loop._checkpoint_sharded,
       minus the Ray upload).

Each path runs in a fresh pair of processes. Rank 0 resets its peak RSS (/proc/self/clear_refs "5" resets
VmHWM), checkpoints, and reads VmHWM: growth = VmHWM - VmRSS before. The target: rank-0 peak during a
checkpoint at most full_state / world + one shard's buffer, i.e. growth <= (largest per-rank tensor shard),
given that rank 0 already holds its 1/world of the state. Printed: full state bytes, per-rank shard bytes, the
growth of each path, and growth / target (<= 1 meets it).

    PYTHONPATH=$PWD flock /tmp/vosr-heavy.lock .venv/bin/python benchmarks/bench_fsdp_checkpoint.py [--depths 4,8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import training.fsdp  # noqa: E402,F401  (imported before the fork)
import training.loop  # noqa: E402,F401
import vosr.model  # noqa: E402,F401

MiB = 2 ** 20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _cfg(hidden: int, depth: int):
    from jobkit.config import load_config

    return load_config(ROOT / "configs/train/tiny.yaml", [f"model.hidden_size={hidden}", f"model.depth={depth}",
                                                           f"model.num_heads={hidden // 64}"])


def _worker(rank: int, world: int, rdzv: str, path: str, hidden: int, depth: int, out: str) -> None:
    import torch.distributed as dist

    from training import fsdp
    from training.loop import _save, make_optimizer
    from training.resume import local_files, write_manifest
    from training.train_state import build_train_state
    from vosr.checkpoint import save_checkpoint
    from vosr.ema import EMA
    from vosr.model import build_dit
    from vosr.sharded import DCP_DIR

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=world)
    try:
        cfg = _cfg(hidden, depth)
        torch.manual_seed(0)
        model = build_dit(cfg)
        ema = EMA(model, 0.999)
        fsdp.shard(model)
        sharded = fsdp.ShardedEMA(ema, model)
        opt = make_optimizer(model.parameters(), cfg.train)
        for p in model.parameters():  # a step with random gradients: the AdamW moments exist, as in training
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sharded.update()
        local = {"params": sum(p.to_local().nbytes for p in model.parameters()),
                 "ema": sum(s.nbytes for s in sharded.shards),
                 "moments": sum(v.to_local().nbytes for st in opt.state.values() for v in st.values()
                                if hasattr(v, "to_local")),
                 "largest_shard": max(p.to_local().nbytes for p in model.parameters())}
        full = {"params": sum(p.nbytes for p in ema.module.parameters())}
        full["state"] = 4 * full["params"]  # weights + EMA + exp_avg + exp_avg_sq (fp32)
        position = {"step": 1, "epoch": 0, "batch_in_epoch": 1, "samples": 8}
        spec = {"job": "pretrain", "run_id": ""}
        def checkpoint(folder: Path) -> None:
            if out.endswith("old.json"):  # the loop before this change
                sharded.gather_into(ema)
                msd, osd = fsdp.full_state(model, opt)
                if rank == 0:
                    import copy

                    m = copy.deepcopy(ema.module)
                    m.load_state_dict(msd)
                    state = build_train_state(None, position, full_optimizer=osd)
                    save_checkpoint(str(folder), cfg, m, ema=ema.module, train_state=state)
                    write_manifest(folder)
            else:
                fsdp.save_sharded(model, opt, sharded, str(folder / DCP_DIR))
                everyone = [None] * world
                dist.all_gather_object(everyone, local_files(folder))
                if rank == 0:
                    _save(folder, cfg, model, None, None, position, spec, sharded=True)
                    write_manifest(folder, {k: v for files in everyone[1:] for k, v in files.items()})

        # A first checkpoint warms up (imports, allocator pools); the second, as every later one in a run, is
        # measured.
        first_growth = 0
        for attempt in ("warmup", "measured"):
            folder = Path(path) / attempt / f"rank{rank}"
            folder.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            before = _status("VmRSS")
            t0 = time.perf_counter()
            checkpoint(folder)
            dist.barrier()
            seconds = time.perf_counter() - t0
            peak = _status("VmHWM")
            first_growth = first_growth or peak - before
        written = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if rank == 0:
            Path(out).write_text(json.dumps({"before": before, "peak": peak, "growth": peak - before, "first_growth": first_growth,
                                             "seconds": seconds, "written_rank0": written, "local": local,
                                             "full": full}))
    finally:
        dist.destroy_process_group()


def run(hidden: int, depth: int, world: int) -> dict:
    res = {}
    for path in ("old", "new"):
        with tempfile.TemporaryDirectory(prefix="vosr-bench-ckpt-") as tmp:
            out = f"{tmp}/{path}.json"
            mp.start_processes(_worker, args=(world, f"file://{tmp}/rdzv", f"{tmp}/ckpt", hidden, depth, out),
                               nprocs=world, join=True, start_method="fork")
            res[path] = json.loads(Path(out).read_text())
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--depths", default="8", help="comma-separated DiT depths (one run pair each)")
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"{'depth':>5} {'full state':>11} {'rank shard':>11} {'max shard':>10} {'old growth':>11} "
          f"{'new growth':>11} {'old/target':>10} {'new/target':>10} {'old s':>6} {'new s':>6}")
    for depth in [int(d) for d in args.depths.split(",")]:
        r = run(args.hidden, depth, args.world)
        loc, full = r["new"]["local"], r["new"]["full"]
        shard = loc["params"] + loc["ema"] + loc["moments"]
        # target: peak <= full/world + one shard buffer; rank 0 already holds ~full/world -> growth <= one buffer
        target = full["state"] / args.world + loc["largest_shard"]
        ratio = {k: (shard + r[k]["growth"]) / target for k in ("old", "new")}
        print(f"{depth:>5} {full['state'] / MiB:>9.1f}Mi {shard / MiB:>9.1f}Mi {loc['largest_shard'] / MiB:>8.2f}Mi "
              f"{r['old']['growth'] / MiB:>9.1f}Mi {r['new']['growth'] / MiB:>9.1f}Mi {ratio['old']:>10.2f} "
              f"{ratio['new']:>10.2f} {r['old']['seconds']:>6.2f} {r['new']['seconds']:>6.2f}")
        print(json.dumps({"depth": depth, "hidden": args.hidden, "world": args.world, "full_state_bytes":
                          full["state"], "rank0_shard_bytes": shard, "largest_shard_bytes": loc["largest_shard"],
                          "old_growth_bytes": r["old"]["growth"], "new_growth_bytes": r["new"]["growth"],
                          "first_checkpoint_growth_bytes": {k: r[k]["first_growth"] for k in r},
                          "old_peak_over_target": round(ratio["old"], 3),
                          "new_peak_over_target": round(ratio["new"], 3),
                          "old_growth_over_full_state": round(r["old"]["growth"] / full["state"], 3),
                          "new_growth_over_full_state": round(r["new"]["growth"] / full["state"], 3),
                          "rank0_written_bytes": {k: r[k]["written_rank0"] for k in r}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
