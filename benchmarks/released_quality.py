"""Check an imported released VOSR model against the paper's Table 1, in one command, through the project's own
evaluation runner (inference/evaluate.py, docs/evaluation.md).

Needs what cannot be downloaded on the project's build machine: a released model folder (VOSR_0.5B_ms, _0.5B_os,
_1.4B_ms or _1.4B_os, with the encoders beside it as the release lays them out: stable-diffusion-2-1-base/,
sd21_lwdecoder.pth, Qwen-Image-vae-2d/, torch_cache/; or hf:// URIs), the benchmark pairs, and for the perceptual
columns the metric weights (eval.metric_weights / pyiqa's cache; each metric that cannot run is listed as skipped
with the reason). A GPU makes it minutes instead of hours. For each dataset given it evaluates the model with the
authors' benchmark settings (inference.preset: realsr for RealSR / DRealSR / LSDIR, screensr for ScreenSR; paper
s4.1: 512 x 512 centre-cropped GT and the 128 x 128 LR for LSDIR and RealSR, whole 512 x 512 images for ScreenSR),
then prints the Table 1 columns, ours beside the paper's number and the difference, and writes the same as JSON.

    .venv/bin/python benchmarks/released_quality.py --model /models/VOSR_0.5B_os \\
        --realsr /data/RealSR_V3/Canon/Test/4 --drealsr /data/DRealSR/Test_x4 \\
        --metric-weights /models/metrics --device cuda --out outputs/released_quality

--model also takes hf://CSWRY/VOSR/VOSR_0.5B_os (fetched into the Hugging Face cache, the encoders then named with
--set autoencoder.path=hf://... etc.) or a folder written by `vosr import`. Sampling is stochastic (posterior and
noise), so a faithful import lands near, not exactly on, the paper's means: PSNR within a few tenths of a dB, the
perceptual metrics within a few percent. DRealSR is not in Table 1 (the paper's Table 4 gives its no-reference
statistics only), so its rows print without a paper column.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (key in the evaluation summary, column title) in the order of the paper's Table 1
COLUMNS = [("psnr", "PSNR↑"), ("ssim", "SSIM↑"), ("lpips", "LPIPS↓"), ("dists", "DISTS↓"), ("afine", "AFINE-FR↓"),
           ("niqe", "NIQE↓"), ("musiq", "MUSIQ↑"), ("maniqa", "MANIQA↑"), ("afine_nr", "AFINE-NR↓"),
           ("topiq_nr", "TOPIQ-NR↑")]

# Paper Table 1 (vosr-paper.txt), VOSR rows: dataset -> model -> the ten columns above.
PAPER_TABLE1 = {
    "LSDIR": {
        "VOSR-0.5B-ms": [19.5677, 0.4312, 0.3984, 0.2126, -0.8310, 4.0466, 73.1033, 0.6679, -1.0844, 0.7231],
        "VOSR-1.4B-ms": [19.3896, 0.4329, 0.3857, 0.1977, -0.9525, 4.4554, 74.0258, 0.6828, -1.0859, 0.6631],
        "VOSR-0.5B-os": [19.3893, 0.4300, 0.3888, 0.2079, -0.7175, 3.6476, 72.4218, 0.6529, -1.0292, 0.6985],
        "VOSR-1.4B-os": [19.2999, 0.4311, 0.3802, 0.1994, -0.5831, 4.1093, 73.7889, 0.6570, -0.9919, 0.6525],
    },
    "ScreenSR": {
        "VOSR-0.5B-ms": [21.6726, 0.5959, 0.2484, 0.1543, -1.5410, 4.3134, 72.7227, 0.7111, -1.2834, 0.7055],
        "VOSR-1.4B-ms": [21.7910, 0.6013, 0.2526, 0.1513, -1.5591, 4.7540, 73.3143, 0.7197, -1.2577, 0.6825],
        "VOSR-0.5B-os": [21.9381, 0.6142, 0.2198, 0.1405, -1.6625, 4.0385, 71.9349, 0.7043, -1.2042, 0.6949],
        "VOSR-1.4B-os": [21.8084, 0.6182, 0.2199, 0.1406, -1.5984, 4.5163, 72.7631, 0.7060, -1.1429, 0.6622],
    },
    "RealSR": {
        "VOSR-0.5B-ms": [25.4361, 0.7125, 0.3069, 0.2260, -0.7413, 5.7070, 68.9277, 0.6429, -1.0620, 0.6554],
        "VOSR-1.4B-ms": [25.2886, 0.7150, 0.2961, 0.2226, -0.7618, 6.2614, 70.4718, 0.6510, -1.0847, 0.6354],
        "VOSR-0.5B-os": [25.4189, 0.7220, 0.2856, 0.2110, -0.9520, 5.2790, 69.7775, 0.6347, -0.9831, 0.6719],
        "VOSR-1.4B-os": [25.2284, 0.7175, 0.2732, 0.2054, -0.9951, 5.4303, 70.5813, 0.6443, -1.0109, 0.6392],
    },
}
# dataset flag -> (name in Table 1, inference preset, GT crop of the paper's protocol)
DATASETS = {"realsr": ("RealSR", "realsr", 512), "drealsr": ("DRealSR", "realsr", 512),
            "lsdir": ("LSDIR", "realsr", 512), "screensr": ("ScreenSR", "screensr", 0)}


def model_name(meta_preset: str, student: bool) -> str:
    size = {"vosr-0.5b": "0.5B", "vosr-1.4b": "1.4B"}.get(meta_preset, meta_preset)
    return f"VOSR-{size}-{'os' if student else 'ms'}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="released folder, its hf:// URI, or a `vosr import` folder")
    for flag, (name, preset, crop) in DATASETS.items():
        p.add_argument(f"--{flag}", default="", help=f"{name} benchmark folder (eval.hr_dir layouts of "
                                                     f"docs/evaluation.md; preset {preset}, crop {crop or 'none'})")
    p.add_argument("--metric-weights", action="append", default=[], help="eval.metric_weights entries")
    p.add_argument("--max-images", type=int, default=0, help="evaluate at most this many images per dataset")
    p.add_argument("--crop", type=int, default=None, help="override every dataset's GT crop (0 = whole images)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="outputs/released_quality", help="one evaluation folder per dataset, and "
                                                                     "released_quality.json")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="further config overrides (e.g. autoencoder.path=..., eval.iqa_metrics=[...])")
    args = p.parse_args(argv)
    if not any(getattr(args, f) for f in DATASETS):
        p.error(f"give at least one dataset: {', '.join('--' + f for f in DATASETS)}")
    return args


def evaluate(args: argparse.Namespace, flag: str) -> dict:
    from inference.evaluate import run
    from jobkit.config import load_config

    name, preset, crop = DATASETS[flag]
    crop = args.crop if args.crop is not None else crop
    out = Path(args.out) / flag
    overrides = [f"inference.checkpoint={args.model}", f"inference.preset={preset}", f"inference.device={args.device}",
                 f"eval.hr_dir={getattr(args, flag)}", f"eval.crop={crop}", f"eval.max_images={args.max_images}",
                 f"eval.dataset_name={name}", "eval.guidance_sweep=[]", f"eval.output={out}",
                 f"run.output_root={out}", "run.mlflow.enabled=false"]
    if args.metric_weights:
        overrides.append(f"eval.metric_weights=[{', '.join(args.metric_weights)}]")
    cfg = load_config(None, [*overrides, *args.set])
    return run(cfg)


def report(summary: dict, flag: str, meta_name: str) -> dict:
    """Our VOSR row beside the paper's (same model, same dataset); prints the table, returns it as a dict."""
    name = DATASETS[flag][0]
    rows = [r for r in summary["rows"] if r["kind"] in ("student", "teacher")]
    if not rows:
        raise SystemExit(f"{name}: the evaluation has no VOSR row (summary {summary.get('summary_json')})")
    ours = rows[0]["metrics"]
    paper = PAPER_TABLE1.get(name, {}).get(meta_name)
    print(f"\n{name} ({summary['data']['images']} images, {rows[0]['label']}, {rows[0]['seconds']:.0f} s) vs paper "
          f"Table 1 {meta_name}" + ("" if paper else " (not in Table 1)"))
    print(f"{'metric':<11}{'ours':>11}{'paper':>11}{'ours-paper':>12}")
    table = {}
    for i, (key, title) in enumerate(COLUMNS):
        v = ours.get(key)
        p = paper[i] if paper else None
        have = v is not None and math.isfinite(v)
        d = v - p if have and p is not None else None
        table[key] = {"ours": v if have else None, "paper": p, "diff": d}
        print(f"{title:<11}{(f'{v:.4f}' if have else 'n/a'):>11}{(f'{p:.4f}' if p is not None else '-'):>11}"
              f"{(f'{d:+.4f}' if d is not None else ''):>12}")
    for metric, why in sorted(summary.get("metrics_skipped", {}).items()):
        print(f"  skipped {metric}: {why}")
    return {"dataset": name, "model": meta_name, "images": summary["data"]["images"], "columns": table,
            "skipped": summary.get("metrics_skipped", {}), "table_md": summary.get("table")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from inference.model_uri import resolve_model
    from vosr.checkpoint import load_checkpoint

    folder = resolve_model(args.model)
    _, _, meta = load_checkpoint(str(folder))   # which released model this is (its size and kind)
    name = model_name(meta.get("preset", ""), bool(meta.get("is_student")))
    results = []
    for flag in DATASETS:
        if getattr(args, flag):
            results.append(report(evaluate(args, flag), flag, name))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "released_quality.json").write_text(json.dumps({"model": args.model, "name": name,
                                                           "imported": meta.get("extra", {}).get("imported"),
                                                           "results": results}, indent=2))
    print(f"\nwritten {out / 'released_quality.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
