"""Teacher (or student) training throughput of a real preset on one GPU: bf16 autocast, fp32 master weights,
AdamW + clip + EMA, random weights, synthetic latents and semantic tokens of the preset's shapes.

Plain PyTorch only (no Ray, MLflow or diffusers imports), so it measures the model step itself.
Needs a CUDA GPU; not run on the CPU-only development machine.

    python benchmarks/gpu_train_throughput.py --preset vosr-0.5b --resolution 512 --batch 32 --steps 20
    python benchmarks/gpu_train_throughput.py --preset vosr-0.5b --job distill --batch 16

Prints one JSON line: samples/s, step time, peak memory, parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="vosr-0.5b")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=32, help="per-GPU batch (paper: 256 global at 512 px on 8 GPUs)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--job", choices=["pretrain", "distill"], default="pretrain")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: fp32 smoke run of the script itself (use --preset tiny)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU; this benchmark needs one"}))
        return 2

    from vosr.config import config_from_dict
    from vosr.distill import distill_loss, student_from_teacher
    from vosr.ema import EMA
    from vosr.flow import training_loss
    from vosr.model import build_dit, model_dims
    from vosr.seeding import generator

    cfg = config_from_dict({"preset": args.preset, "data": {"resolution": args.resolution}})
    dims = model_dims(cfg)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True  # docs/method.md s5: TF32 enabled
    torch.backends.cudnn.allow_tf32 = True
    teacher = build_dit(cfg, device=dev)
    if args.job == "distill":
        model = student_from_teacher(teacher, cfg).to(dev)
        teacher.eval().requires_grad_(False)
    else:
        model = teacher
    model.train()
    ema = EMA(model, 0.9999)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    fwd = torch.compile(model) if args.compile else model
    side = args.resolution // dims["downsample"]
    b = args.batch
    hq = torch.randn(b, dims["latent_channels"], side, side, device=dev)
    lq = torch.randn_like(hq)
    sem = torch.randn(b, dims["sem_tokens"], dims["sem_dim"], device=dev)

    def step(i: int) -> float:
        g = generator(i, device=args.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if args.job == "distill":
                loss, _ = distill_loss(fwd, teacher, hq, lq, sem, cfg.distill, cfg.flow, g)
            else:
                loss, _ = training_loss(fwd, hq, lq, sem, cfg.flow, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        return float(loss.detach())

    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    out = {
        "benchmark": "gpu_train_throughput", "preset": args.preset, "job": args.job,
        "resolution": args.resolution, "batch_per_gpu": b, "tokens_per_image": (side // dims["patch_size"]) ** 2,
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "step_s": round(dt, 4), "samples_per_s": round(b / dt, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "precision": "bf16 autocast, fp32 master weights" if cuda else "fp32",
        "compile": bool(args.compile),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
