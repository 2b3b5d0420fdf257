"""Peak memory of `vosr upscale` on a large input at real-preset shapes, with default flags and with a configured
budget (inference.memory_budget_mb): does `--tile auto` keep the process under the budget?

    python benchmarks/bench_upscale_memory.py                                   # 512 px input (2048 px out), 0.5B
    python benchmarks/bench_upscale_memory.py --input-size 2048 --budgets 0 12000   # the 2048 px input (GPU-sized work)
    python benchmarks/bench_upscale_memory.py --input-size 2048 --plan-only     # the memory plans only, no run

Everything has random weights (memory does not depend on their values): a DiT of the preset's shapes (student,
saved as a checkpoint folder), a VAE of the SD2.1 VAE's public config saved in diffusers layout (--vae sd21; or
the weight-free pixel codec at f = 8, --vae pixel), DINOv2-shaped semantic tokens (semantic.allow_random). Each
row runs the real CLI in its own process (`python -m jobkit.cli upscale IN OUT --checkpoint ...`) and reads that
process's peak resident memory from the kernel (wait4 ru_maxrss), next to the plan's estimate (vosr/memory.py)
and the tiles it chose. Budget 0 = default flags (the budget is then 75% of the available RAM). The untiled plan
(`--tile off`) is printed as an estimate only unless --run-untiled (it may not fit this machine).
--depth N builds N DiT blocks instead of the preset's (same width and tokens, so the same activations per block)
for a shorter CPU run: the plan and the budget check are then those of the smaller model, and the weight bytes of
the missing blocks are printed (peak_with_all_blocks_mb = measured + missing; the full model under the same
tiling needs the budget raised by the same amount).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD21_VAE = dict(  # public config of stabilityai/stable-diffusion-2-1 vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, act_fn="silu", norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=768, scaling_factor=0.18215)
MIB = 2 ** 20


def prepare(work: Path, preset: str, depth: int, vae: str, input_size: int) -> tuple[Path, Path, list[str], int]:
    """(checkpoint folder, input image, config overrides, bytes of the DiT blocks left out by --depth)."""
    import torch
    from PIL import Image

    from jobkit.config import config_from_dict
    from vosr.checkpoint import save_checkpoint
    from vosr.model import build_dit

    overrides = ["semantic.allow_random=true"]
    if vae == "sd21":
        vae_dir = work / "vae"
        if not (vae_dir / "config.json").is_file():
            from diffusers import AutoencoderKL

            torch.manual_seed(0)
            AutoencoderKL(**SD21_VAE).save_pretrained(vae_dir)
        overrides.append(f"autoencoder.path={vae_dir}")
    else:
        overrides += ["autoencoder.name=pixel", "autoencoder.downsample=8"]
    cfg = config_from_dict({"preset": preset}, overrides)
    full_depth = cfg.model.depth
    ckpt = work / f"ckpt-{preset}-d{depth or full_depth}-{vae}"
    build_cfg = config_from_dict({"preset": preset}, [*overrides, f"model.depth={depth or full_depth}"])
    torch.manual_seed(0)
    model = build_dit(build_cfg, student=True)
    block_bytes = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    if not (ckpt / "config.json").is_file():
        save_checkpoint(str(ckpt), build_cfg, model)
    del model
    image = work / f"input-{input_size}.png"
    if not image.is_file():
        photo = sorted((ROOT / "assets" / "photos").glob("*.png"))[0]
        Image.open(photo).convert("RGB").resize((input_size, input_size), Image.BICUBIC).save(image)
    missing = (full_depth - (depth or full_depth)) * block_bytes
    return ckpt, image, overrides, missing


def plans(ckpt: Path, overrides: list[str], input_size: int, budgets: list[int]) -> dict:
    """The memory plans of the untiled run and of `--tile auto` under each budget (in this process)."""
    from jobkit.config import config_from_dict
    from vosr.upscaler import Upscaler

    cfg = config_from_dict({}, [*overrides, "inference.device=cpu"])
    out = {}
    for budget in budgets:
        up = Upscaler(str(ckpt), cfg, device="cpu", memory_budget_mb=budget)
        opts = up.resolve()
        size = (input_size, input_size)
        if "untiled" not in out:
            out["untiled"] = up.memory_plan(size, opts.replace(tile_auto=False)).describe()
        fitted = up.fit_memory(size, opts)
        out[f"budget_{budget}"] = {"budget_mb": round(up.memory_budget / MIB), "tile_px": fitted.tile_size,
                                   "vae_tile_px": fitted.vae_tile, **up.memory_plan(size, fitted).describe()}
        del up
    return out


def run_cli(ckpt: Path, image: Path, out: Path, overrides: list[str], budget: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "jobkit.cli", "upscale", str(image), str(out), "--checkpoint", str(ckpt),
           "--device", "cpu", "--no-progress", "--overwrite", *[x for o in overrides for x in ("--set", o)], *extra]
    if budget:
        cmd += ["--memory-budget-mb", str(budget)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stdout.json", "w") as fo, open(out / "stderr.txt", "w") as fe:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(proc.pid, 0)          # this child's own peak RSS (KiB on Linux)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    stdout, stderr = (out / "stdout.json").read_text(), (out / "stderr.txt").read_text()
    peak_kib = usage.ru_maxrss
    if proc.returncode != 0:
        raise RuntimeError(f"vosr upscale failed ({proc.returncode}): {stderr[-2000:]}")
    return {"summary": json.loads(stdout), "peak_rss_mb": round(peak_kib / 1024, 1), "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vosr-0.5b", choices=["vosr-0.5b", "vosr-1.4b", "tiny"])
    p.add_argument("--input-size", type=int, default=512, help="square input side in pixels (output x4)")
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 6000],
                   help="inference.memory_budget_mb per row (0 = default flags)")
    p.add_argument("--depth", type=int, default=0, help="DiT blocks to build (0 = the preset's)")
    p.add_argument("--vae", default="sd21", choices=["sd21", "pixel"])
    p.add_argument("--workdir", default="", help="where the random checkpoint, VAE and input go (reused)")
    p.add_argument("--plan-only", action="store_true", help="print the memory plans, run nothing")
    p.add_argument("--run-untiled", action="store_true", help="also run --tile off (may exceed this machine)")
    args = p.parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vosr-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, image, overrides, missing = prepare(work, args.preset, args.depth, args.vae, args.input_size)
    result = {"preset": args.preset, "input": f"{args.input_size}x{args.input_size}",
              "output": f"{4 * args.input_size}x{4 * args.input_size}", "vae": args.vae,
              "dit_blocks_built": args.depth or "all", "missing_block_weights_mb": round(missing / MIB, 1),
              "plans": plans(ckpt, overrides, args.input_size, args.budgets)}
    if not args.plan_only:
        rows = []
        for budget in args.budgets:
            r = run_cli(ckpt, image, work / f"out-{budget}", overrides, budget, [])
            s = r["summary"]
            rows.append({"flags": "default" if not budget else f"--memory-budget-mb {budget}",
                         "budget_mb": s["memory_budget_mb"], "measured_peak_mb": r["peak_rss_mb"],
                         "peak_with_all_blocks_mb": round(r["peak_rss_mb"] + missing / MIB, 1),
                         "estimate_mb": s.get("memory_estimate_mb"), "auto_tiled": s.get("auto_tiled", {}),
                         "under_budget": r["peak_rss_mb"] <= s["memory_budget_mb"],
                         "seconds": r["seconds"]})
            print(json.dumps(rows[-1]), flush=True)
        if args.run_untiled:
            r = run_cli(ckpt, image, work / "out-untiled", overrides, 0, ["--tile", "off"])
            rows.append({"flags": "--tile off", "measured_peak_mb": r["peak_rss_mb"],
                         "peak_with_all_blocks_mb": round(r["peak_rss_mb"] + missing / MIB, 1),
                         "seconds": r["seconds"]})
        result["rows"] = rows
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
