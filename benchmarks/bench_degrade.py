"""Degradation throughput per core at 512x512 (target >= 5 images/s/core) and where the time goes.

    .venv/bin/python benchmarks/bench_degrade.py [--images 40] [--size 512] [--threads 1] [--device cpu]

Crops come from real photos (../shared/data/dev when present, else assets/photos). Each image is degraded with
its own seed (per-image randomness, docs/method.md s0); the per-step breakdown sums the stage timers of the
realesrgan preset. On a shared machine wall-clock numbers drop with the load; images per CPU-second (process
time, one thread) is the per-core rate without that effect. Both are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from photos import photo_paths  # noqa: E402  (benchmarks/photos.py)
from PIL import Image  # noqa: E402

from jobkit.config import config_from_dict  # noqa: E402
from vosr.degrade import degrade, random_crop  # noqa: E402


def crops(n: int, size: int) -> list[torch.Tensor]:
    paths = photo_paths()
    out = []
    for i in range(n):
        with Image.open(paths[i % len(paths)]) as im:
            arr, _ = random_crop(im, size, seed=i)
        out.append(torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None].float() / 255.0)
    return out


def bench(preset: str, images: list[torch.Tensor], device: str) -> dict:
    cfg = config_from_dict({"degrade": {"preset": preset}}).degrade
    degrade(images[0].to(device), [0], cfg)  # warm-up
    timings: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    for i, x in enumerate(images):
        degrade(x.to(device), [1000 + i], cfg, timings)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    total = sum(timings.values()) or 1.0
    return {"preset": preset, "images": len(images), "wall_s": round(wall, 3),
            "images_per_s": round(len(images) / wall, 2), "cpu_s": round(cpu, 3),
            "images_per_cpu_s": round(len(images) / cpu, 2),
            "breakdown_s_per_image": {k: round(v / len(images), 5) for k, v in sorted(timings.items())},
            "breakdown_fraction": {k: round(v / total, 3) for k, v in sorted(timings.items())}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)  # OpenCV (blur, JPEG) on the same core budget
    images = crops(args.images, args.size)
    res = {"size": args.size, "threads": args.threads, "device": args.device,
           "realesrgan": bench("realesrgan", images, args.device),
           "bicubic": bench("bicubic", images, args.device)}
    per_core = res["realesrgan"]["images_per_s"] / max(args.threads, 1)
    res["realesrgan_images_per_s_per_core"] = round(per_core, 2)
    # CPU seconds of this process: the per-core rate without the time lost to other jobs on a shared machine
    res["realesrgan_images_per_cpu_s"] = res["realesrgan"]["images_per_cpu_s"]
    res["target_images_per_s_per_core"] = 5.0
    res["ratio_to_target"] = round(per_core / 5.0, 2)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
