"""One-step vs 25-step guided latency of the full upscaler (encode, semantic tokens, sampling, decode, colour fix),
same preset, same image size, measured in one run. Target: >= 13x (the paper's ratio for VOSR-0.5B).

    python benchmarks/bench_inference.py                           # tiny preset on CPU (what runs everywhere)
    python benchmarks/bench_inference.py --preset vosr-0.5b --size 512 --device cuda --fp16   # on a GPU machine

Weights are random (timing does not depend on their values). Real presets need the SD2.1 VAE weights for their
autoencoder; without --ae-path the weight-free pixel codec at the same factor 8 stands in (its decoder is far
cheaper than the VAE's, so the ratio is then an upper bound for the full pipeline), and the DINOv2-shaped semantic
encoder runs with random weights (semantic.allow_random). The one-step model is the student (r-embedder), the
multi-step model the teacher with guidance (2 NFEs per step, docs/method.md s6).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(preset: str, ae_path: str, device: str):
    import torch

    from jobkit.config import config_from_dict
    from vosr.model import build_dit
    from vosr.upscaler import Upscaler

    overrides = [f"preset={preset}", f"inference.device={device}", "semantic.allow_random=true"]
    if preset != "tiny":
        overrides += [f"autoencoder.path={ae_path}"] if ae_path else ["autoencoder.name=pixel",
                                                                       "autoencoder.downsample=8"]
    cfg = config_from_dict({}, overrides)
    torch.manual_seed(0)
    student = build_dit(cfg, student=True)
    teacher = build_dit(cfg, student=False)
    return (Upscaler((student, cfg), cfg, device=device), Upscaler((teacher, cfg), cfg, device=device), cfg)


def timed(fn, iters: int, device: str) -> list[float]:
    import torch

    out = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    import torch
    from PIL import Image

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "vosr-0.5b", "vosr-1.4b"])
    p.add_argument("--size", type=int, default=256, help="output size in pixels (LR = size / 4)")
    p.add_argument("--steps", type=int, default=25, help="multi-step Euler steps (docs/method.md s6: 25)")
    p.add_argument("--guidance", type=float, default=0.5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--fp16", action="store_true", help="fp16 autocast on CUDA (the paper's timings are FP16)")
    p.add_argument("--ae-path", default="", help="SD2.1 VAE folder for real presets (else the pixel codec)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    one, multi, cfg = build(args.preset, args.ae_path, args.device)
    photo = sorted(q for q in (ROOT / "assets" / "photos").iterdir() if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
    lr = Image.open(photo[0]).convert("RGB").resize((args.size // 4, args.size // 4), Image.BICUBIC)

    def run_one():
        one.upscale(lr, mode="onestep", steps=1)

    def run_multi():
        multi.upscale(lr, mode="multistep", steps=args.steps, guidance=args.guidance)

    ctx = torch.autocast("cuda", dtype=torch.float16) if args.fp16 and args.device == "cuda" else None
    if ctx:
        ctx.__enter__()
    try:
        timed(run_one, args.warmup, args.device)
        timed(run_multi, args.warmup, args.device)
        t_one = timed(run_one, args.iters, args.device)
        t_multi = timed(run_multi, max(1, args.iters // 2), args.device)
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    med_one, med_multi = statistics.median(t_one), statistics.median(t_multi)
    result = {
        "preset": args.preset, "autoencoder": one.autoencoder.identity().get("name"), "device": args.device,
        "threads": torch.get_num_threads(), "fp16": bool(ctx), "output_size": args.size,
        "onestep_nfe": 1, "multistep_nfe": 2 * args.steps,
        "onestep_s": {"median": round(med_one, 4), "all": [round(t, 4) for t in t_one]},
        "multistep_s": {"median": round(med_multi, 4), "all": [round(t, 4) for t in t_multi]},
        "speedup": round(med_multi / med_one, 2), "target": 13.0,
        "meets_target": med_multi / med_one >= 13.0,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
