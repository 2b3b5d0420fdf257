"""Calibration of the native-scale sharpness filter (curate.filters.min_sharpness) on real photos.

    .venv/bin/python benchmarks/bench_sharpness.py [--threshold T] [--limit N] [--photos DIR]

For every real photo (../shared/data/dev when present, else assets/photos): the original as stored, its JPEG
re-encodes at quality 85, 90 and 95 (must pass), and copies downscaled by 1.5x, 2x, 3x, 4x and re-upscaled to
the original size with bicubic and with Lanczos (the upscales of 2x or more must be rejected). Prints the score
distribution per group, the ROC AUC (originals + JPEGs against the >= 2x upscales, and against all upscales), the
keep / reject rates at the threshold (default: the config default) and the stage-1 CPU cost per image (decode +
filters + hashes, with the part the sharpness score takes) at three image sizes with its growth exponent.
Targets (issue 14): >= 95% of originals and of their q85-95 JPEGs kept; >= 95% of >= 2x upscales rejected.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.photos import photo_paths  # noqa: E402
from jobkit.config import config_from_dict  # noqa: E402
from pipelines.curation.analysis import analyse, grey_at, grey_entropy, native_sharpness  # noqa: E402
from vosr.imageio import decode_image  # noqa: E402

FILTERS = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
SCALES = (1.5, 2.0, 3.0, 4.0)
QUALITIES = (85, 90, 95)


def jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def variants(data: bytes):
    """(group, image) for one photo: the original, its JPEG re-encodes and its upscaled copies."""
    img = decode_image(data, 10**9)
    yield "original", img
    for q in QUALITIES:
        yield f"jpeg_q{q}", decode_image(jpeg(img, q), 10**9)
    w, h = img.size
    for s in SCALES:
        for name, f in FILTERS.items():
            small = img.resize((max(1, round(w / s)), max(1, round(h / s))), f)
            yield f"up{s:g}x_{name}", small.resize((w, h), f)


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half): the area under the ROC curve."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def cpu_cost(data: list[bytes], filters, repeat: int = 1) -> tuple[float, float]:
    """(analyse, native_sharpness) CPU seconds per image over `data` (process time, this process only)."""
    t0 = time.process_time()
    for _ in range(repeat):
        for d in data:
            try:
                analyse(d, filters)
            except Exception:  # noqa: BLE001 - a rejected image costs the same work up to its rejection
                pass
    t_all = (time.process_time() - t0) / (repeat * len(data))
    imgs = [decode_image(d, 10**9) for d in data]
    t0 = time.process_time()
    for _ in range(repeat):
        for img in imgs:
            native_sharpness(img)
    return t_all, (time.process_time() - t0) / (repeat * len(imgs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_cfg = config_from_dict({}).curate.filters
    ap.add_argument("--threshold", type=float, default=default_cfg.min_sharpness)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N photos (0 = all)")
    ap.add_argument("--photos", default="", help="folder of photos (default: ../shared/data/dev, else assets/photos)")
    args = ap.parse_args()
    paths = (sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
             if args.photos else photo_paths())[: args.limit or None]
    print(f"[bench_sharpness] {len(paths)} photos from {paths[0].parent}; threshold {args.threshold}")
    scores: dict[str, list[float]] = {}
    entropies = []
    t0 = time.perf_counter()
    for p in paths:
        data = p.read_bytes()
        for group, img in variants(data):
            scores.setdefault(group, []).append(native_sharpness(img))
            if group == "original":
                entropies.append(grey_entropy(grey_at(img, default_cfg.analysis_size)))
    print(f"[bench_sharpness] scored {sum(len(v) for v in scores.values())} images in {time.perf_counter() - t0:.1f}s")
    thr = args.threshold
    print(f"{'group':<18}{'n':>4}{'min':>8}{'p05':>8}{'median':>8}{'max':>8}{'kept':>8}{'rejected':>10}")
    for group, vals in scores.items():
        v = np.asarray(vals)
        kept = float(np.mean(v >= thr))
        print(f"{group:<18}{len(v):>4}{v.min():>8.2f}{np.percentile(v, 5):>8.2f}{np.median(v):>8.2f}"
              f"{v.max():>8.2f}{kept:>8.1%}{1 - kept:>10.1%}")
    pos = np.concatenate([scores["original"]] + [scores[f"jpeg_q{q}"] for q in QUALITIES])
    neg2 = np.concatenate([v for g, v in scores.items() if g.startswith("up") and not g.startswith("up1.5x")])
    neg_all = np.concatenate([v for g, v in scores.items() if g.startswith("up")])
    keep_orig = min(float(np.mean(np.asarray(scores[g]) >= thr))
                    for g in ["original"] + [f"jpeg_q{q}" for q in QUALITIES])
    rej2 = min(float(np.mean(np.asarray(v) < thr)) for g, v in scores.items()
               if g.startswith("up") and not g.startswith("up1.5x"))
    print(f"ROC AUC originals+JPEG q85-95 vs upscaled >= 2x: {roc_auc(pos, neg2):.4f}; vs all upscales "
          f"(incl. 1.5x): {roc_auc(pos, neg_all):.4f}")
    print(f"at threshold {thr}: worst kept rate of originals / JPEG groups {keep_orig:.1%} (target >= 95%), "
          f"worst rejected rate of the >= 2x upscale groups {rej2:.1%} (target >= 95%) -> "
          f"{'MET' if keep_orig >= 0.95 and rej2 >= 0.95 else 'NOT MET'}")
    print(f"grey-level entropy of the originals at {default_cfg.analysis_size} px: min {min(entropies):.2f} bits, "
          f"median {np.median(entropies):.2f} (default min_entropy {default_cfg.min_entropy})")

    # stage-1 CPU cost per image at three sizes (the same photos resized), with the growth exponent
    filters = config_from_dict({"curate": {"filters": {"min_short_side": 16}}}).curate.filters
    sample = [decode_image(p.read_bytes(), 10**9) for p in paths[:8]]
    sizes, costs = [], []
    cpu_cost([jpeg(sample[0], 92)], filters)  # warm-up (first-call costs would skew the smallest size)
    for target in (512, 1024, 2048):
        data = []
        for img in sample:
            s = target / max(img.size)
            data.append(jpeg(img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC),
                             92))
        t_all, t_sharp = cpu_cost(data, filters)
        mp = float(np.mean([Image.open(io.BytesIO(d)).size[0] * Image.open(io.BytesIO(d)).size[1] for d in data]))
        sizes.append(mp)
        costs.append(t_all)
        print(f"stage-1 analyse of a {mp / 1e6:.2f} MP JPEG: {t_all * 1e3:.1f} ms CPU per image, of which "
              f"native_sharpness {t_sharp * 1e3:.1f} ms ({t_sharp / t_all:.0%})")
    slope = float(np.polyfit(np.log(sizes), np.log(costs), 1)[0])
    print(f"growth exponent of analyse CPU time in pixels: {slope:.2f}; at 100M images of "
          f"{sizes[1] / 1e6:.1f} MP: {costs[1] * 1e8 / 3600:.0f} CPU-hours for stage-1 analysis")


if __name__ == "__main__":
    main()
