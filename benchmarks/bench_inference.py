"""One-step vs 25-step guided latency of the full upscaler (encode, semantic tokens, sampling, decode, colour fix),
same preset, same image size, measured in one run. Target: >= 13x (the paper's ratio for VOSR-0.5B).

    python benchmarks/bench_inference.py                           # tiny preset on CPU (what runs everywhere)
    python benchmarks/bench_inference.py --preset vosr-0.5b --size 512 --device cuda --dtype fp16   # on a GPU

Precision (--compare-dtype bf16|fp16): the one-step student at fp32 and at that dtype (vosr.upscaler's
inference.dtype: DiT and semantic encoder cast, autoencoder under autocast), same weights, same inputs, measured in
one run: the speed ratio fp32 / dtype, the PSNR-Y between the two outputs, and each output's PSNR-Y against the
HR photo (centre crops of the held-out demo photos, demo/holdout.txt; LR = bicubic / 4) with their difference:

    python benchmarks/bench_inference.py --compare-dtype bf16                               # tiny, CPU
    python benchmarks/bench_inference.py --compare-dtype bf16 --checkpoint models:/vosr-demo-student/latest \
        --tracking-uri sqlite:///$PWD/outputs/demo/mlflow.db           # the demo's trained tiny student
    python benchmarks/bench_inference.py --compare-dtype bf16 --preset vosr-0.5b --size 512 --iters 2   # CPU
    python benchmarks/bench_inference.py --compare-dtype fp16 --preset vosr-0.5b --size 512 --device cuda \
        --iters 20      # the GPU line: target >= 1.8x over fp32

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


def build(preset: str, ae_path: str, device: str, dtype: str = "fp32"):
    import torch

    from vosr.model import build_dit
    from vosr.upscaler import Upscaler

    cfg = _config(preset, ae_path, device)
    torch.manual_seed(0)
    student = build_dit(cfg, student=True)
    teacher = build_dit(cfg, student=False)
    return (Upscaler((student, cfg), cfg, device=device, dtype=dtype),
            Upscaler((teacher, cfg), cfg, device=device, dtype=dtype), cfg)


def _config(preset: str, ae_path: str, device: str):
    from jobkit.config import config_from_dict

    overrides = [f"preset={preset}", f"inference.device={device}", "semantic.allow_random=true"]
    if preset != "tiny":
        overrides += [f"autoencoder.path={ae_path}"] if ae_path else ["autoencoder.name=pixel",
                                                                       "autoencoder.downsample=8"]
    return config_from_dict({}, overrides)


def holdout_pairs(size: int, count: int):
    """(HR centre crop size x size, its bicubic / 4 LR) of the first `count` held-out demo photos."""
    from PIL import Image

    names = [x.strip() for x in (ROOT / "demo" / "holdout.txt").read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    pairs = []
    for name in names[:count]:
        im = Image.open(ROOT / "assets" / "photos" / name).convert("RGB")
        c = min(size, im.width, im.height) // 4 * 4
        left, top = (im.width - c) // 2, (im.height - c) // 2
        hr = im.crop((left, top, left + c, top + c))
        pairs.append((hr, hr.resize((c // 4, c // 4), Image.BICUBIC)))
    return pairs


def compare_dtype(args) -> dict:
    """fp32 vs args.compare_dtype on the one-step student: speed ratio and PSNR-Y differences (one run)."""
    import copy

    import torch

    from vosr.metrics import psnr_y
    from vosr.model import build_dit
    from vosr.upscaler import Upscaler

    if args.checkpoint:
        from vosr.checkpoint import load_checkpoint
        from vosr.model_uri import resolve

        folder = resolve(args.checkpoint, tracking_uri=args.tracking_uri)
        model, cfg, _ = load_checkpoint(str(folder), use_ema=True)
        cfg = cfg.replace(inference=cfg.inference.__class__(**{**cfg.inference.__dict__, "device": args.device}))
        source = args.checkpoint
    else:
        cfg = _config(args.preset, args.ae_path, args.device)
        torch.manual_seed(0)
        model = build_dit(cfg, student=True)
        with torch.no_grad():   # the final layer is zero at init (docs/method.md s4): random, so the model matters
            model.final_layer.linear.weight.normal_(0, 0.05)
            model.final_layer.adaLN_modulation[1].weight.normal_(0, 0.05)
        source = f"random {args.preset} student"
    ups = {d: Upscaler((copy.deepcopy(model), cfg), cfg, device=args.device, dtype=d)
           for d in ("fp32", args.compare_dtype)}
    pairs = holdout_pairs(args.size, args.photos)
    rows, times = [], {d: [] for d in ups}
    for i, (hr, lr) in enumerate(pairs):
        outs = {}
        for d, up in ups.items():
            if i == 0:
                up.upscale(lr, seed=42)                                      # warm-up on the first photo
            for _ in range(args.iters):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                outs[d] = up.upscale(lr, seed=42)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[d].append(time.perf_counter() - t0)
        p32, pd = psnr_y(outs["fp32"], hr, border=4), psnr_y(outs[args.compare_dtype], hr, border=4)
        rows.append({"photo": i, "psnr_y_fp32": round(p32, 3), f"psnr_y_{args.compare_dtype}": round(pd, 3),
                     "difference_db": round(pd - p32, 4),
                     "psnr_y_between_outputs": round(psnr_y(outs["fp32"], outs[args.compare_dtype]), 2)})
    med = {d: statistics.median(t) for d, t in times.items()}
    diffs = [abs(r["difference_db"]) for r in rows]
    gpu = args.device == "cuda"
    return {"model": source, "preset": cfg.preset, "device": args.device, "threads": torch.get_num_threads(),
            "output_size": args.size, "photos": len(pairs), "iters": args.iters,
            "seconds_per_image": {d: round(v, 4) for d, v in med.items()},
            "speed_ratio": round(med["fp32"] / med[args.compare_dtype], 3),
            "target_speed_ratio": 1.8 if gpu else None,
            "meets_speed_target": (med["fp32"] / med[args.compare_dtype] >= 1.8) if gpu else None,
            "max_abs_psnr_y_difference_db": round(max(diffs), 4),
            "mean_psnr_y_between_outputs_db": round(statistics.mean(r["psnr_y_between_outputs"] for r in rows), 2),
            "psnr_target_db": 0.1, "meets_psnr_target": max(diffs) <= 0.1, "rows": rows}



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
    p.add_argument("--fp16", action="store_true", help="same as --dtype fp16 (the paper's timings are FP16)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="inference.dtype")
    p.add_argument("--compare-dtype", default="", choices=["", "bf16", "fp16"],
                   help="time and compare the one-step student at fp32 and at this dtype (see above)")
    p.add_argument("--checkpoint", default="", help="--compare-dtype: a trained student (folder or URI)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI for a models:/ --checkpoint")
    p.add_argument("--photos", type=int, default=6, help="--compare-dtype: held-out photos to use")
    p.add_argument("--ae-path", default="", help="SD2.1 VAE folder for real presets (else the pixel codec)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_dtype:
        print(json.dumps(compare_dtype(args), indent=2))
        return 0
    dtype = "fp16" if args.fp16 else args.dtype
    one, multi, cfg = build(args.preset, args.ae_path, args.device, dtype)
    photo = sorted(q for q in (ROOT / "assets" / "photos").iterdir() if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
    lr = Image.open(photo[0]).convert("RGB").resize((args.size // 4, args.size // 4), Image.BICUBIC)

    def run_one():
        one.upscale(lr, mode="onestep", steps=1)

    def run_multi():
        multi.upscale(lr, mode="multistep", steps=args.steps, guidance=args.guidance)

    timed(run_one, args.warmup, args.device)
    timed(run_multi, args.warmup, args.device)
    t_one = timed(run_one, args.iters, args.device)
    t_multi = timed(run_multi, max(1, args.iters // 2), args.device)
    med_one, med_multi = statistics.median(t_one), statistics.median(t_multi)
    result = {
        "preset": args.preset, "autoencoder": one.autoencoder.identity().get("name"), "device": args.device,
        "threads": torch.get_num_threads(), "dtype": dtype, "output_size": args.size,
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
