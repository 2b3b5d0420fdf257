"""Upscale a file or a folder of images into a folder: `python inference/upscale.py IN OUT [options]`
(also `vosr upscale ...`).

Outputs are PNGs named after the input (<stem>.png). Existing outputs are skipped unless --force. Images that
cannot be decoded are counted by reason and reported; the others are still written. Exit status: 0 when every
input was written or skipped, 1 when some failed, 2 for a bad command line or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from vosr.choices import COLOR_FIXES, MODES
from vosr.imageio import IMAGE_SUFFIXES  # the one list of decoded formats

ROOT = Path(__file__).resolve().parents[1]

def list_inputs(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if src.is_dir():
        return sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    raise FileNotFoundError(f"input {src} is neither a file nor a folder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vosr upscale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="an image file or a folder of images")
    p.add_argument("output", help="output folder (created)")
    p.add_argument("--config", default=None, help="YAML config (e.g. configs/upscale/tiny.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a key")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder or models:/name/version")
    p.add_argument("--mode", choices=MODES, default=None)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the mode's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance s (multi-step)")
    p.add_argument("--weak-strength", type=float, default=None, help="weak-branch strength w (multi-step)")
    p.add_argument("--tile", type=int, default=None, help="tile size in pixels (0 = off)")
    p.add_argument("--tile-overlap", type=int, default=None, help="tile overlap in pixels")
    p.add_argument("--color-fix", choices=COLOR_FIXES, default=None)
    p.add_argument("--upscale", type=int, default=None, help="upscale factor (default 4)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    """CLI flags become config overrides, but only those actually given (docs/method.md s9.2: the reference let
    every CLI default silently override the stored configuration)."""
    pairs = [("inference.checkpoint", args.checkpoint), ("inference.mode", args.mode),
             ("flow.guidance_scale", args.guidance), ("flow.weak_strength", args.weak_strength),
             ("inference.tile_size", args.tile), ("inference.tile_overlap", args.tile_overlap),
             ("inference.color_fix", args.color_fix), ("inference.upscale", args.upscale),
             ("inference.seed", args.seed), ("inference.device", args.device)]
    return [f"{k}={v}" for k, v in pairs if v is not None]


def run(cfg, src: str | Path, dst: str | Path, force: bool = False, steps: int | None = None,
        progress: bool = True) -> dict:
    """Upscale every image of `src` into `dst`; returns counts and timings."""
    from tqdm import tqdm

    from inference.model_uri import resolve_model
    from vosr.imageio import ImageDecodeError, decode_image
    from vosr.upscaler import Upscaler

    src, dst = Path(src), Path(dst)
    inputs = list_inputs(src)
    dst.mkdir(parents=True, exist_ok=True)
    todo = [(p, dst / f"{p.stem}.png") for p in inputs]
    pending = [(p, o) for p, o in todo if force or not o.exists()]
    summary = {"inputs": len(inputs), "written": 0, "skipped_existing": len(todo) - len(pending), "failed": 0,
               "failures": {}, "output": str(dst), "seconds": 0.0}
    if not pending:
        return summary
    folder = resolve_model(cfg.inference.checkpoint, cfg)
    upscaler = Upscaler(folder, cfg)
    opts = upscaler.resolve(steps=steps) if steps else upscaler.resolve()
    summary["checkpoint"] = str(folder)
    summary["options"] = {k: getattr(opts, k) for k in ("mode", "steps", "guidance", "tile_size", "color_fix",
                                                        "upscale", "seed")}
    reasons: Counter[str] = Counter()
    t0 = time.perf_counter()
    bar = tqdm(pending, desc="upscale", unit="img", disable=not progress)
    for path, out in bar:
        bar.set_postfix_str(path.name[:30])
        try:
            img = decode_image(path.read_bytes(), max_pixels=cfg.serve.max_pixels)
        except ImageDecodeError as exc:
            reasons[exc.reason] += 1
            print(f"skip {path}: {exc}", file=sys.stderr)
            continue
        result = upscaler.upscale(img, opts)
        tmp = out.with_name(out.name + ".tmp")
        result.save(tmp, format="PNG")
        tmp.replace(out)  # never leave a half-written PNG that a re-run would skip
        summary["written"] += 1
    summary["failed"] = sum(reasons.values())
    summary["failures"] = dict(reasons)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    from jobkit.config import ConfigError, load_config

    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, [*args.set, *_overrides(args)])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg, args.input, args.output, force=args.force, steps=args.steps,
                      progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
