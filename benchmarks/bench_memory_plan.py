"""The memory plan (training/memory_plan.py) against real steps on this CPU, then the shipped cluster configs'
plans on an 80 GiB GPU.

Part 1, three small sizes: each row plans one optimiser step with fake tensors (what the plan does at full size)
and runs the same step for real on the CPU, where torch.profiler records every allocation and free of the CPU
allocator; the measured peak is the largest running sum of those. Printed per row: planned and measured peak,
their error (target: within 15%), and seconds of each.

Part 2 (--cluster): the plan of configs/cluster/pretrain-256.yaml, pretrain.yaml and distill.yaml at full size,
for each activation checkpointing setting (none, every 2nd block, every block): peak, fits, largest micro-batch.

    python benchmarks/bench_memory_plan.py              # part 1 (~1-3 min on 2 CPUs)
    python benchmarks/bench_memory_plan.py --cluster    # and part 2 (~5-10 min: 7-9 full-size fake steps per config)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, overrides, job, micro-batch, precision, checkpointing interval)
SIZES = [
    ("tiny 64px fp32 pretrain", ["data.resolution=64"], "pretrain", 8, "fp32", 0),
    ("tiny 128px bf16-autocast pretrain ckpt/2", ["data.resolution=128"], "pretrain", 4, "bf16", 2),
    ("D256 x6 128px fp32 distill ckpt/1",
     ["data.resolution=128", "model.hidden_size=256", "model.depth=6", "model.num_heads=4"], "distill", 4, "fp32", 1),
]
CLUSTER = ("pretrain-256", "pretrain", "distill")


def small_sizes() -> list[dict]:
    import torch

    from jobkit.config import config_from_dict
    from training.memory_plan import StepSetup, measure_cpu_step, simulate_step

    torch.set_num_threads(1)
    rows = []
    for label, overrides, job, micro, precision, ckpt in SIZES:
        cfg = config_from_dict({}, overrides)
        setup = StepSetup(job, micro_batch=micro, precision=precision, checkpointing=ckpt)
        plan = simulate_step(cfg, setup)
        t0 = time.perf_counter()
        measured = measure_cpu_step(cfg, setup)
        real_s = time.perf_counter() - t0
        err = plan.peak_bytes / measured - 1
        rows.append({"size": label, "planned_mib": round(plan.peak_bytes / 2**20, 2),
                     "measured_mib": round(measured / 2**20, 2), "error_pct": round(100 * err, 2),
                     "within_15pct": abs(err) <= 0.15, "plan_s": round(plan.seconds, 1), "real_s": round(real_s, 1),
                     "peak_phase": plan.peak_phase})
        r = rows[-1]
        print(f"{label:<42} planned {r['planned_mib']:9.2f} MiB  measured {r['measured_mib']:9.2f} MiB  "
              f"error {r['error_pct']:+6.2f}%  (plan {r['plan_s']} s, real {r['real_s']} s)", flush=True)
    return rows


def cluster_plans() -> list[dict]:
    from jobkit.config import load_config
    from training.memory_plan import format_plan, plan_training

    out = []
    for name in CLUSTER:
        cfg = load_config(ROOT / "configs" / "cluster" / f"{name}.yaml")
        plan = plan_training(cfg, log=lambda line, name=name: print(f"  [{name}] {line}", file=sys.stderr,
                                                                     flush=True))
        print(f"configs/cluster/{name}.yaml\n{format_plan(plan)}", flush=True)
        out.append({"config": name, **plan.to_dict()})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", action="store_true", help="also plan the shipped cluster training configs")
    p.add_argument("--json", default="", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    result = {"small_sizes": small_sizes()}
    worst = max(abs(r["error_pct"]) for r in result["small_sizes"])
    print(f"largest error {worst:.2f}% (target: within 15% at every size)")
    if args.cluster:
        result["cluster"] = cluster_plans()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if worst <= 15 else 1


if __name__ == "__main__":
    raise SystemExit(main())
