"""How good can the demo's tiny models get on this machine? The tuning harness behind configs/demo/*.yaml.

It measures teacher and student against bicubic on PSNR-Y on the demo's held-out photos. This script
replays the demo's recipe without Ray or MLflow so that one setting costs minutes, not a whole chain: the shipped
photos minus demo/holdout.txt, K seeded (crop, Real-ESRGAN degradation) variants each encoded with the tiny
preset's codecs, the method library's flow-matching loss (vosr.flow.training_loss) with AdamW + EMA, then the
held-out photos under the evaluation stage's protocol (centre crop, seeded degradation of the HR, x4, PSNR-Y with
a 4 px border, tiles of the training size). Every evaluation prints PSNR-Y minus bicubic for each (Euler steps,
guidance s), the same for the average of several noise seeds of the 1-step output (an estimate of the posterior
mean the network has learnt: how far a sampler's own randomness is from the ceiling), and with
--distill-steps the one-step student of vosr.distill.

    .venv/bin/python benchmarks/demo_quality.py --steps 1000 --variants 64
    .venv/bin/python benchmarks/demo_quality.py --steps 1000 --distill-steps 200 --omega 1.0

The results of the runs that chose the demo's configs are in docs/demo-tuning.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from jobkit.config import config_from_dict  # noqa: E402
from vosr.degrade import degrade, random_crop  # noqa: E402
from vosr.distill import distill_loss, student_from_teacher  # noqa: E402
from vosr.ema import EMA  # noqa: E402
from vosr.encoders import build_autoencoder, build_semantic_encoder  # noqa: E402
from vosr.features import encode_views  # noqa: E402
from vosr.flow import training_loss  # noqa: E402
from vosr.imageio import image_to_tensor, tensor_to_image  # noqa: E402
from vosr.metrics import psnr_y  # noqa: E402
from vosr.model import build_dit  # noqa: E402
from vosr.seeding import sample_seed  # noqa: E402
from vosr.upscaler import Upscaler, bicubic_upsample  # noqa: E402

PHOTOS = ROOT / "assets" / "photos"


def holdout_names() -> list[str]:
    lines = (ROOT / "demo" / "holdout.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def training_photos() -> list[Path]:
    """The shipped photos the demo trains on: all but the held-out ones."""
    hold = set(holdout_names())
    return sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in {".png", ".jpg"} and p.name not in hold)


def build_config(a):
    over = {"data": {"resolution": a.resolution},
            "model": {"hidden_size": a.width, "depth": a.depth, "num_heads": a.heads, "patch_size": a.patch},
            "distill": {"omega": a.omega, "method": a.distill_method}}
    return config_from_dict({"preset": "tiny", **over}, a.set)


def training_set(cfg, variants: int, seed: int):
    """HR latents, LR latents and raw semantic tokens of `variants` seeded (crop, degradation) pairs per photo."""
    ae, sem = build_autoencoder(cfg.autoencoder), build_semantic_encoder(cfg.semantic)
    photos = training_photos()
    hq, lq, tok = [], [], []
    for p in photos:
        img = Image.open(p).convert("RGB")
        for v in range(variants):
            crop, _ = random_crop(img, cfg.data.resolution, sample_seed(seed, p.name, v, "crop"))
            hr = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0
            lr, _ = degrade(hr, [sample_seed(seed, p.name, v, "degrade")], cfg.degrade)
            h, lo, t = encode_views(ae, sem, hr, lr)
            hq.append(h)
            lq.append(lo)
            tok.append(t)
    return torch.cat(hq), torch.cat(lq), torch.cat(tok), len(photos)


def eval_pairs(cfg, crop: int, seed: int, names: list[str] | None = None):
    """(HR, LR) of the held-out photos (or of `names`) exactly as inference/evaluate.py makes them."""
    dcfg = dataclasses.replace(cfg.degrade, resize_back=False)
    pairs = []
    for name in holdout_names() if names is None else names:
        hr = Image.open(PHOTOS / name).convert("RGB")
        w, h = hr.size
        hr = hr.crop(((w - crop) // 2, (h - crop) // 2, (w - crop) // 2 + crop, (h - crop) // 2 + crop))
        lr_t, _ = degrade(image_to_tensor(hr)[None], [sample_seed(seed, name, 0, "eval-degrade")], dcfg)
        pairs.append((hr, tensor_to_image(lr_t[0])))
    return pairs


def mean_image(images) -> Image.Image:
    return Image.fromarray(np.mean([np.asarray(im, np.float64) for im in images], 0).round().astype(np.uint8))


def evaluate(model, cfg, pairs, a, student: bool = False) -> dict[str, float]:
    """PSNR-Y minus bicubic (dB), averaged over the held-out photos, per setting."""
    up = Upscaler((model, cfg), cfg, device="cpu")
    kw = {"tile_size": a.tile, "tile_overlap": a.tile // 4, "color_fix": a.color_fix}
    rows: dict[str, list[float]] = {}
    for hr, lr in pairs:
        bic = psnr_y(hr, bicubic_upsample(lr, 4), border=4)
        if student:
            out = up.upscale(lr, mode="onestep", steps=1, **kw)
            rows.setdefault("student 1 step", []).append(psnr_y(hr, out, border=4) - bic)
            continue
        for n in a.eval_steps:
            for s in a.guidance:
                out = up.upscale(lr, mode="multistep", guidance=s, steps=n, **kw)
                rows.setdefault(f"teacher {n} steps s={s:g}", []).append(psnr_y(hr, out, border=4) - bic)
        if a.mean_seeds > 1:
            outs = [up.upscale(lr, mode="multistep", guidance=1.0, steps=1, seed=k, **kw) for k in range(a.mean_seeds)]
            rows.setdefault(f"mean of {a.mean_seeds} seeds, 1 step s=1", []).append(
                psnr_y(hr, mean_image(outs), border=4) - bic)
    return {k: round(float(np.mean(v)), 3) for k, v in rows.items()}


def optimiser_step(loss: torch.Tensor, model, opt, ema: EMA) -> None:
    """Backward, global-norm clip 1.0, AdamW step, EMA update (docs/method.md s5), as the training loop does."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema.update(model)


def lr_at(step: int, a) -> float:
    """Constant (paper), with an optional linear cool-down to 0 over the last `cooldown` fraction of steps."""
    start = int(a.steps * (1.0 - a.cooldown))
    if a.cooldown <= 0 or step < start:
        return a.lr
    return a.lr * (a.steps - step) / max(1, a.steps - start)


def report(tag: str, step: int, res: dict, t0: float) -> None:
    print(json.dumps({"phase": tag, "step": step, "seconds": round(time.time() - t0, 1), **res}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--cooldown", type=float, default=0.0, help="fraction of steps with a linear LR decay to 0")
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--variants", type=int, default=16, help="K seeded variants per photo (precompute.variants)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="extra config override section.key=value")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-steps", type=int, nargs="+", default=[1, 2, 8], help="Euler steps of the teacher rows")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    p.add_argument("--mean-seeds", type=int, default=0, help="also score the mean of this many 1-step outputs")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--color-fix", default="adain")
    p.add_argument("--distill-steps", type=int, default=0)
    p.add_argument("--distill-lr", type=float, default=2e-4)
    p.add_argument("--distill-ema", type=float, default=0.95)
    p.add_argument("--distill-method", default="rcgm")
    p.add_argument("--omega", type=float, default=0.5)
    p.add_argument("--distill-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default="", help="with --distill-steps: save the student (EMA) as a checkpoint folder")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = build_config(a)
    t0 = time.time()
    hq, lq, tok, n_photos = training_set(cfg, a.variants, a.seed)
    pairs = eval_pairs(cfg, a.crop, a.seed)
    report("data", 0, {"photos": n_photos, "rows": int(hq.shape[0]), "holdout": len(pairs)}, t0)

    model = build_dit(cfg)
    ema = EMA(model, a.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)  # docs/method.md s5
    g = torch.Generator().manual_seed(a.seed + 1)
    t_train = time.time()
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a)
        idx = torch.randint(0, hq.shape[0], (a.batch,), generator=g)
        loss, _ = training_loss(model, hq[idx], lq[idx], tok[idx], cfg.flow, g)
        optimiser_step(loss, model, opt, ema)
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            sec = time.time() - t_train
            report("teacher", step + 1, {"s_per_step": round(sec / (step + 1), 3), **evaluate(ema.module, cfg, pairs, a)}, t0)

    if a.distill_steps:
        teacher = ema.module
        student = student_from_teacher(teacher, cfg)
        s_ema = EMA(student, a.distill_ema)
        report("student", 0, evaluate(s_ema.module, cfg, pairs, a, student=True), t0)
        opt = torch.optim.AdamW(student.parameters(), lr=a.distill_lr, betas=(0.9, 0.95), weight_decay=0.01)
        for step in range(a.distill_steps):
            idx = torch.randint(0, hq.shape[0], (a.batch,), generator=g)
            loss, _ = distill_loss(student, teacher, hq[idx], lq[idx], tok[idx], cfg.distill, cfg.flow, g)
            optimiser_step(loss, student, opt, s_ema)
            if (step + 1) % a.distill_every == 0 or step + 1 == a.distill_steps:
                report("student", step + 1, evaluate(s_ema.module, cfg, pairs, a, student=True), t0)
        if a.save:   # a checkpoint folder the upscaler loads (e.g. bench_inference.py --compare-dtype --checkpoint)
            from vosr.checkpoint import save_checkpoint

            save_checkpoint(a.save, cfg, s_ema.module, extra={"step": a.distill_steps, "source": "demo_quality"})
            print(json.dumps({"saved_student": a.save}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
