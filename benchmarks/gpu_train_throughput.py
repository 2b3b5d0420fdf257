"""Training throughput of the real presets on one GPU, next to the memory plan's prediction for the same step.

For each preset: the worker the training loop builds (training/memory_plan.build_worker: random weights, AdamW with
clipping, EMA; the distillation teacher for --job distill), a synthetic batch of the preset's shapes, bf16 autocast
with fp32 master weights, `--steps` timed optimiser steps after `--warmup`. Printed per preset: samples/s, step
time, the measured peak (torch.cuda.max_memory_allocated) and the plan's peak for the same step
(training/memory_plan.simulate_step, one worker so no DDP buckets), with their ratio.

    python benchmarks/gpu_train_throughput.py                                   # vosr-0.5b and vosr-1.4b, 512 px
    python benchmarks/gpu_train_throughput.py --batch 16 --checkpointing 2 --compile
    python benchmarks/gpu_train_throughput.py --job distill --batch 4
    python benchmarks/gpu_train_throughput.py --smoke                           # CPU: tiny preset, fp32, 1 step
    python benchmarks/gpu_train_throughput.py --device cpu --resolution 64 --batch 1 --steps 1 --warmup 1 \
        --set model.depth=1                                                     # CPU check of both real presets

Plain PyTorch (no Ray, MLflow or diffusers imports): it needs only torch, timm and this repository.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GIB = 2**30
# training/memory_plan.py at 512 px, bf16, one worker, no checkpointing: vosr-0.5b 16 -> 59.6 GiB (19 fit);
# vosr-1.4b 4 -> 46.4 GiB, 8 -> 69.4 GiB (needs 78.3 GiB with the plan's margins: too close to 80)
DEFAULT_BATCH = {"tiny": 2, "vosr-0.5b": 16, "vosr-1.4b": 4}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="vosr-0.5b,vosr-1.4b", help="comma-separated presets, run in turn")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=0,
                   help=f"per-GPU micro-batch; 0: each preset's default {DEFAULT_BATCH}, which the memory plan "
                        "fits on an 80 GiB GPU at 512 px without checkpointing (configs/cluster/pretrain.yaml: 16)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--job", choices=["pretrain", "distill"], default="pretrain")
    p.add_argument("--checkpointing", type=int, default=0,
                   help="train.activation_checkpointing: 0 none, 1 every block, k every k-th block")
    p.add_argument("--compile", action="store_true", help="train.compile: torch.compile each block")
    p.add_argument("--no-plan", action="store_true", help="skip the memory plan (it takes ~10-30 s of CPU)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every preset (e.g. model.depth=1 for a CPU check of the real presets)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run of the script itself: tiny preset, 64 px, batch 2, fp32, 1 step")
    args = p.parse_args(argv)
    if args.smoke:
        args.presets, args.resolution, args.steps, args.warmup, args.device = "tiny", 64, 1, 1, "cpu"
    return args


def run_preset(preset: str, args) -> dict:
    from jobkit.config import config_from_dict
    from training.memory_plan import (
        StepSetup,
        build_worker,
        create_optimizer_state,
        simulate_step,
        train_step,
    )
    from vosr.model import compile_dit, model_dims

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    overrides = [f"data.resolution={args.resolution}", f"train.activation_checkpointing={args.checkpointing}",
                 *args.set]
    if preset != "tiny":
        overrides.append("semantic.allow_random=true")
    cfg = config_from_dict({"preset": preset}, overrides)
    batch = args.batch or DEFAULT_BATCH.get(preset, 8)
    setup = StepSetup(args.job, micro_batch=batch, precision="bf16" if cuda else "fp32",
                      checkpointing=args.checkpointing)
    planned = None if args.no_plan else simulate_step(cfg, setup)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    job = build_worker(cfg, setup, dev)
    if args.compile:
        compile_dit(job.model)
        if getattr(job.objective, "teacher", None) is not None:
            compile_dit(job.objective.teacher)
    create_optimizer_state(job, cfg.train.grad_clip)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        train_step(job, setup, i + 1, dev, cfg.train.grad_clip)
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        train_step(job, setup, args.warmup + i + 1, dev, cfg.train.grad_clip)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    measured = torch.cuda.max_memory_allocated() / GIB if cuda else None
    dims = model_dims(cfg)
    out = {
        "preset": preset, "job": args.job, "resolution": args.resolution, "batch_per_gpu": batch,
        "tokens_per_image": (args.resolution // dims["downsample"] // dims["patch_size"]) ** 2,
        "params_millions": round(sum(p.numel() for p in job.model.parameters()) / 1e6, 2),
        "checkpointing": args.checkpointing, "compile": bool(args.compile),
        "warmup_s": round(warm_s, 2), "step_s": round(dt, 4), "samples_per_s": round(batch / dt, 2),
        "peak_gib_measured": None if measured is None else round(measured, 2),
        "peak_gib_planned": None if planned is None else round(planned.peak_gib, 2),
        "measured_over_planned": (round(measured / planned.peak_gib, 3)
                                  if measured is not None and planned is not None else None),
    }
    del job
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU; this benchmark needs one (or run --smoke on the CPU)"}))
        return 2
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # docs/method.md s5: TF32 enabled
        torch.backends.cudnn.allow_tf32 = True
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    rows = []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        try:
            row = run_preset(preset, args)
        except torch.OutOfMemoryError as exc:
            row = {"preset": preset, "batch_per_gpu": args.batch or DEFAULT_BATCH.get(preset, 8),
                   "error": f"out of memory: {str(exc)[:200]}"}
            torch.cuda.empty_cache()
        rows.append(row)
        if "error" in row:
            print(f"{preset:>10}: {row['error']}", flush=True)
        else:
            print(f"{preset:>10}: {row['samples_per_s']:8.2f} samples/s  step {row['step_s']:.3f} s  batch "
                  f"{row['batch_per_gpu']}  peak {row['peak_gib_measured']} GiB measured / "
                  f"{row['peak_gib_planned']} GiB planned", flush=True)
    print(json.dumps({"benchmark": "gpu_train_throughput", "device": device, "torch": torch.__version__,
                      "precision": "bf16 autocast, fp32 master weights" if args.device == "cuda" else "fp32",
                      "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
