"""CPU timings of the DiT: tiny preset forward+backward at its training size, vosr-0.5b forward at 256x256.

    .venv/bin/python benchmarks/bench_model.py [--tiny-batch 8] [--big-batch 1] [--repeats 3] [--threads 1]
    .venv/bin/python benchmarks/bench_model.py --skip-big      # tiny only

Random weights built from the presets (no checkpoints). vosr-0.5b at 256x256 px is a 32x32 SD latent = 16x16 = 256
image tokens attending to 1024 semantic tokens (DINOv2 at 448). fp32 on CPU, batch 1 for the big model by default
(~2 GB of weights). Prints the median of `--repeats` runs after one warm-up, the load average (the box may be
shared: compare numbers from one run only), and per-token throughput. No Ray, no MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from jobkit.config import config_from_dict  # noqa: E402
from vosr.flow import training_loss  # noqa: E402
from vosr.model import build_dit, count_parameters, model_dims  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inputs(cfg, batch: int, latent: int, seed: int = 0):
    d = model_dims(cfg)
    g = torch.Generator().manual_seed(seed)
    c = d["latent_channels"]
    return (torch.randn(batch, c, latent, latent, generator=g), torch.randn(batch, c, latent, latent, generator=g),
            torch.randn(batch, d["sem_tokens"], d["sem_dim"], generator=g))


def bench_tiny(batch: int, repeats: int) -> dict:
    cfg = config_from_dict({"preset": "tiny"})
    d = model_dims(cfg)
    latent = cfg.data.resolution // d["downsample"]
    torch.manual_seed(0)
    model = build_dit(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    hq, lq, sem = inputs(cfg, batch, latent)
    g = torch.Generator().manual_seed(1)

    def step():
        loss, _ = training_loss(model, hq, lq, sem, cfg.flow, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = median_time(step, repeats)
    tokens = batch * (latent // d["patch_size"]) ** 2
    return {"what": "tiny fwd+bwd+AdamW step", "resolution_px": cfg.data.resolution, "latent": latent,
            "batch": batch, "tokens_per_image": tokens // batch, "params": count_parameters(cfg)["dit_params"],
            "step_s": round(t, 4), "images_per_s": round(batch / t, 2)}


def bench_big(batch: int, repeats: int, size: int = 256) -> dict:
    cfg = config_from_dict({"preset": "vosr-0.5b"})
    d = model_dims(cfg)
    latent = size // d["downsample"]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_dit(cfg).eval()
    build_s = time.perf_counter() - t0
    z, lq, sem = inputs(cfg, batch, latent)
    t = torch.full((batch,), 0.5)

    def fwd():
        with torch.inference_mode():
            model(z, t, lq, sem)

    sec = median_time(fwd, repeats)
    return {"what": "vosr-0.5b forward (fp32, CPU)", "resolution_px": size, "latent": latent, "batch": batch,
            "image_tokens": (latent // d["patch_size"]) ** 2, "semantic_tokens": d["sem_tokens"],
            "params": sum(p.numel() for p in model.parameters()), "build_s": round(build_s, 2),
            "forward_s": round(sec, 3), "one_step_equiv_s": round(sec, 3),
            "guided_25_step_equiv_s": round(sec * 25 * 2, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny-batch", type=int, default=8)
    p.add_argument("--big-batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch default; on a shared "
                   "box 1 avoids OpenMP oversubscription stalls)")
    p.add_argument("--skip-big", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    out["tiny"] = bench_tiny(args.tiny_batch, args.repeats)
    print(json.dumps(out["tiny"]), flush=True)
    if not args.skip_big:
        out["vosr_0_5b"] = bench_big(args.big_batch, args.repeats)
        print(json.dumps(out["vosr_0_5b"]), flush=True)
        out["ratio_big_forward_over_tiny_step"] = round(out["vosr_0_5b"]["forward_s"] / out["tiny"]["step_s"], 1)
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
