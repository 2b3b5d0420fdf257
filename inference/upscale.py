"""Upscale image files, folders and glob patterns into a folder:
    vosr upscale INPUT [INPUT ...] OUTPUT [options]        (also `python inference/upscale.py ...`)

INPUT is an image file, a folder (its images; with --recursive also those in sub-folders, whose layout the
output mirrors) or a glob pattern in quotes ("photos/*.png", "shoots/**/*.jpg" with --recursive).

Outputs are named <input stem><--suffix>.<--ext> (png default; jpg and webp take --quality). Names never collide:
when two inputs would give the same output (a.jpg and a.png -> a.png), nothing runs and the colliding inputs are
named; --keep-ext names outputs after the whole input name instead (a.jpg -> a.jpg.png), which cannot collide.
An output never replaces one of the inputs. An existing output is kept unless --overwrite; a file appears complete
or not at all. The summary's "written" counts the files written.

Precision: --dtype fp32 (default) | bf16 | fp16 (CUDA only). Memory: --tile auto (default) tiles the model and the
autoencoder when an image would not fit inference.memory_budget_mb (0 = most of this machine's memory);
--tile off never tiles; --tile N always uses N px tiles.

Stages: resolve the inputs and outputs (usage errors stop here, before any work) -> load the model (a folder,
s3:// or models:/name@alias; MLflow from run.mlflow.* else MLFLOW_TRACKING_URI) -> per image: decode, upscale
(a progress bar per image and one for the whole set), write.
Exit status: 0 when every input was written or kept, 1 when some could not be read or the run failed, 2 for a
bad command line, configuration or input set.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from vosr.choices import COLOR_FIXES, MODES
from vosr.imageio import IMAGE_SUFFIXES  # the one list of decoded formats

OUTPUT_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


class UsageError(ValueError):
    """A command line or input set that cannot run; nothing has been done."""


@dataclass(frozen=True)
class Item:
    source: Path      # the input file
    output: Path      # where its result goes


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def _walk(folder: Path, recursive: bool, skip: Path | None) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (skip is None or (here / d).resolve() != skip))
        found += [here / f for f in sorted(files) if _is_image(here / f)]
        if not recursive:
            break
    return found


def list_inputs(specs: list[str], recursive: bool = False, skip: Path | None = None) -> list[tuple[Path, Path]]:
    """(image file, the folder its output path is relative to) for every input spec, each file once."""
    out: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for spec in specs:
        p = Path(spec).expanduser()
        if glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=recursive))
            if not matches:
                raise UsageError(f"the pattern {spec!r} matches no file")
            base = Path(spec.split("*")[0].split("?")[0].split("[")[0])
            base = base if spec.endswith(os.sep) or base.is_dir() else base.parent
            pairs = [(m, base) for m in matches if _is_image(m)]
        elif p.is_dir():
            pairs = [(f, p) for f in _walk(p, recursive, skip)]
        elif p.is_file():
            pairs = [(p, p.parent)]
        else:
            raise UsageError(f"input {spec} is neither a file, a folder nor a pattern that matches")
        for f, base in pairs:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append((f, base))
    return out


def plan_outputs(inputs: list[tuple[Path, Path]], dst: Path, suffix: str, ext: str, keep_ext: bool,
                 check: bool = True) -> list[Item]:
    """The output path of every input; refuses (UsageError, before any work) outputs that collide with each other
    (compared case-insensitively, as on macOS and Windows) or with an input."""
    items = []
    for src, base in inputs:
        try:
            rel = src.relative_to(base)
        except ValueError:
            rel = Path(src.name)
        name = (rel.name if keep_ext else rel.stem) + suffix + "." + ext
        items.append(Item(src, dst / rel.parent / name))
    if not check:
        return items
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        groups[str(it.output.resolve()).lower()].append(it)
    clashes = [g for g in groups.values() if len(g) > 1]
    if clashes:
        lines = [f"{', '.join(str(i.source) for i in g)} -> {g[0].output}" for g in clashes[:10]]
        more = f" (and {len(clashes) - 10} more)" if len(clashes) > 10 else ""
        raise UsageError(f"{sum(len(g) for g in clashes)} inputs would write the same output file: "
                         f"{'; '.join(lines)}{more}. Use --keep-ext (a.jpg -> a.jpg.{ext}) or rename the inputs")
    inputs_set = {src.resolve() for src, _ in inputs}
    over = [it for it in items if it.output.resolve() in inputs_set]
    if over:
        raise UsageError(f"the output of {over[0].source} would replace an input file ({over[0].output}); choose "
                         "another output folder, --suffix or --ext")
    return items


def tile_value(text: str) -> str:
    t = text.strip().lower()
    if t in ("auto", "off"):
        return t
    if t.isdigit():
        return "off" if int(t) == 0 else t
    raise argparse.ArgumentTypeError(f"--tile takes auto, off or a size in pixels, not {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from jobkit.args import job_parser

    p = job_parser(__doc__, prog="vosr upscale")
    p.add_argument("paths", nargs="+", metavar="INPUT ... OUTPUT",
                   help="image files, folders or quoted glob patterns, then the output folder (created)")
    p.add_argument("-r", "--recursive", action="store_true", help="walk sub-folders (and ** in patterns)")
    p.add_argument("--suffix", default="", help="added to each output name before the extension, e.g. _x4")
    p.add_argument("--ext", choices=sorted(OUTPUT_FORMATS), default="png", help="output format (default png)")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (1-100, default 95)")
    p.add_argument("--keep-ext", action="store_true",
                   help="name outputs after the whole input name (a.jpg -> a.jpg.png): never collides")
    p.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                   help="replace existing outputs (default: keep them)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder, s3:// folder or models:/name@alias")
    p.add_argument("--mode", choices=MODES, default=None)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the mode's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance s (multi-step)")
    p.add_argument("--weak-strength", type=float, default=None, help="weak-branch strength w (multi-step)")
    p.add_argument("--tile", type=tile_value, default=None,
                   help="auto (default: tile only when an image would not fit the memory budget), off, or a tile "
                        "size in pixels of the x4 image")
    p.add_argument("--tile-overlap", type=int, default=None, help="tile overlap in pixels")
    p.add_argument("--vae-tile", type=int, default=None, help="autoencoder tile in pixels (0 = automatic)")
    p.add_argument("--memory-budget-mb", type=int, default=None, help="memory an upscale may use (0 = detect)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="model precision (fp16 needs CUDA; default fp32)")
    p.add_argument("--color-fix", choices=COLOR_FIXES, default=None)
    p.add_argument("--upscale", type=int, default=None, help="upscale factor (default 4)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    """CLI flags become config overrides, but only those actually given (docs/method.md s9.2: the reference let
    every CLI default silently override the stored configuration)."""
    pairs = [("inference.checkpoint", args.checkpoint), ("inference.mode", args.mode),
             ("flow.guidance_scale", args.guidance), ("flow.weak_strength", args.weak_strength),
             ("inference.tile_overlap", args.tile_overlap), ("inference.vae_tile_size", args.vae_tile),
             ("inference.memory_budget_mb", args.memory_budget_mb), ("inference.dtype", args.dtype),
             ("inference.color_fix", args.color_fix), ("inference.upscale", args.upscale),
             ("inference.seed", args.seed), ("inference.device", args.device)]
    if args.tile == "auto":
        pairs += [("inference.tile_size", 0), ("inference.tile_auto", "true")]
    elif args.tile == "off":
        pairs += [("inference.tile_size", 0), ("inference.tile_auto", "false")]
    elif args.tile is not None:
        pairs += [("inference.tile_size", args.tile)]
    return [f"{k}={v}" for k, v in pairs if v is not None]


def _save(img, path: Path, ext: str, quality: int) -> None:
    """Write atomically: a hidden temporary file beside the output, renamed over it when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.vosr-tmp")
    kw = {"quality": quality} if ext in ("jpg", "webp") else {}
    try:
        img.save(tmp, format=OUTPUT_FORMATS[ext], **kw)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def run(cfg, inputs: list[str] | str | Path, dst: str | Path, force: bool = False, steps: int | None = None,
        progress: bool = True, recursive: bool = False, suffix: str = "", ext: str = "png", keep_ext: bool = False,
        quality: int = 95) -> dict:
    """Upscale every image of `inputs` into `dst`; returns counts and timings. Raises UsageError (nothing done)
    for an input set that cannot run."""
    from tqdm import tqdm

    from inference.model_uri import resolve_model
    from vosr.imageio import ImageDecodeError, decode_image
    from vosr.upscaler import Upscaler, pick_device, pick_dtype

    specs = [str(inputs)] if isinstance(inputs, (str, Path)) else [str(s) for s in inputs]
    dst = Path(dst)
    if ext not in OUTPUT_FORMATS:
        raise UsageError(f"--ext {ext!r} is not one of {sorted(OUTPUT_FORMATS)}")
    if not 1 <= quality <= 100:
        raise UsageError(f"--quality must be within 1..100, got {quality}")
    try:
        pick_dtype(cfg.inference.dtype, pick_device(cfg.inference.device))  # fp16 on CPU: refused before work
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    found = list_inputs(specs, recursive, skip=dst.resolve() if dst.exists() else None)
    # never upscale our own outputs: files in an output folder below an input folder, and (output folder = input
    # folder) the outputs of the other inputs from an earlier run (a_x4.png beside a.png)
    found = [(f, b) for f, b in found if dst.resolve() not in f.resolve().parents or f.parent.resolve() == b.resolve()]
    planned = {it.output.resolve(): it.source.resolve()
               for it in plan_outputs(found, dst, suffix, ext, keep_ext, check=False)}
    kept = [(f, b) for f, b in found if planned.get(f.resolve(), f.resolve()) == f.resolve()] or found
    earlier_outputs = len(found) - len(kept)
    found = kept
    if not found:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(specs)}"
                         + ("" if recursive else " (sub-folders need --recursive)"))
    items = plan_outputs(found, dst, suffix, ext, keep_ext)
    pending = [it for it in items if force or not it.output.exists()]
    summary = {"inputs": len(items), "written": 0, "skipped_existing": len(items) - len(pending), "failed": 0,
               "failures": {}, "output": str(dst), "seconds": 0.0}
    if earlier_outputs:
        summary["skipped_as_outputs"] = earlier_outputs     # inputs that are other inputs' outputs
    if not pending:
        return summary
    folder = resolve_model(cfg.inference.checkpoint, cfg)
    upscaler = Upscaler(folder, cfg)
    try:
        opts = upscaler.resolve(steps=steps) if steps else upscaler.resolve()
    except ValueError as exc:          # options this checkpoint cannot honour (e.g. multistep on a student)
        raise UsageError(str(exc)) from None
    summary["checkpoint"] = cfg.inference.checkpoint if "://" in cfg.inference.checkpoint else str(folder)
    summary["options"] = {k: getattr(opts, k) for k in ("mode", "steps", "guidance", "tile_size", "tile_auto",
                                                        "color_fix", "upscale", "seed")}
    summary["dtype"] = upscaler.dtype_name
    summary["memory_budget_mb"] = round(upscaler.memory_budget / 2**20)
    reasons: Counter[str] = Counter()
    tiled: Counter[str] = Counter()
    t0 = time.perf_counter()
    bar = tqdm(total=len(pending), desc="upscale", unit="img", disable=not progress, dynamic_ncols=True)
    for it in pending:
        bar.set_postfix_str(it.source.name[:30])
        try:
            img = decode_image(it.source.read_bytes(), max_pixels=cfg.inference.max_pixels)
        except (ImageDecodeError, OSError) as exc:
            reason = getattr(exc, "reason", type(exc).__name__)
            reasons[reason] += 1
            bar.write(f"skip {it.source}: {exc}", file=sys.stderr)
            bar.update(1)
            continue
        run_opts = upscaler.fit_memory(img.size, opts)
        estimate = upscaler.memory_plan(img.size, run_opts).peak / 2**20
        summary["memory_estimate_mb"] = round(max(summary.get("memory_estimate_mb", 0.0), estimate), 1)
        if run_opts.tile_size != opts.tile_size or run_opts.vae_tile != opts.vae_tile:
            tiled[f"tile {run_opts.tile_size} px, autoencoder tile {run_opts.vae_tile} px"] += 1
        plan = upscaler.plan(img.size, run_opts)
        inner = tqdm(total=plan.tiles * plan.steps + 2, desc=it.source.name[:24], unit="step", leave=False,
                     position=1, disable=not progress, dynamic_ncols=True)
        upscaler.on_progress = inner.update
        try:
            result = upscaler.upscale(img, run_opts)
        finally:
            upscaler.on_progress = None
            inner.close()
        _save(result, it.output, ext, quality)
        summary["written"] += 1
        bar.update(1)
    bar.close()
    summary["failed"] = sum(reasons.values())
    summary["failures"] = dict(reasons)
    if tiled:
        summary["auto_tiled"] = dict(tiled)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def split_paths(paths: list[str]) -> tuple[list[str], str]:
    if len(paths) < 2:
        raise UsageError("give at least one INPUT and the OUTPUT folder")
    return paths[:-1], paths[-1]


def main(argv: list[str] | None = None) -> int:
    import json

    from inference.model_uri import ModelNotFoundError
    from jobkit.config import ConfigError, load_config
    from vosr.config import redact

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        inputs, output = split_paths(args.paths)
        cfg = load_config(args.config, [*args.set, *_overrides(args)])
    except (UsageError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg, inputs, output, force=args.overwrite, steps=args.steps, progress=not args.no_progress,
                      recursive=args.recursive, suffix=args.suffix, ext=args.ext, keep_ext=args.keep_ext,
                      quality=args.quality)
    except (UsageError, ModelNotFoundError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line naming the cause; --debug shows the traceback
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (--debug shows the traceback)", file=sys.stderr)
        return 1
    print(json.dumps(redact(summary), indent=2, default=str))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
