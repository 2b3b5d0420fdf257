"""How far above bicubic can ANY model trained on the demo's data get? A regression ceiling for the quality bar.

Can generative outputs (a teacher sample, a one-step student) beat bicubic on PSNR-Y on the demo's held-out
photos? A sample's squared error is the posterior mean's error plus the posterior's
spread, so no sampler can beat the best posterior-mean estimate a model can learn from the same data. This script
estimates that estimate's ceiling directly, without any generative machinery: a plain residual CNN on the tiny
preset's pixel-codec latents (input: the LR latent; output: the LR latent plus a learnt correction, zero at
initialisation so it starts AT bicubic), trained with the MSE to the HR latent, which is the posterior-mean
objective. Same training rows as benchmarks/demo_quality.py (the shipped photos minus demo/holdout.txt, K seeded
crop + Real-ESRGAN degradation variants each), same evaluation protocol (inference/evaluate.py's centre crops and
seeded degradation), scored on the held-out photos AND on the training photos under that protocol.

    .venv/bin/python benchmarks/demo_ceiling.py                      # ~2 min on 2 cores
    .venv/bin/python benchmarks/demo_ceiling.py --channels 128 --steps 4000

Prints one JSON line per evaluation: PSNR-Y minus bicubic (dB), mean over the photos, for the EMA weights. The
numbers measured on 2026-11-27 are in docs/demo-tuning.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # demo_quality puts the repository root on the path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from demo_quality import build_config, eval_pairs, report, training_photos, training_set  # noqa: E402
from torch import nn  # noqa: E402

from vosr.ema import EMA  # noqa: E402
from vosr.encoders import build_autoencoder  # noqa: E402
from vosr.imageio import image_to_tensor, tensor_to_image  # noqa: E402
from vosr.metrics import psnr_y  # noqa: E402
from vosr.upscaler import bicubic_upsample  # noqa: E402


class ResidualCNN(nn.Module):
    """LR latent -> LR latent + correction; 3x3 convs with GELU; the last conv starts at zero (output = bicubic)."""

    def __init__(self, channels_in: int, width: int, layers: int):
        super().__init__()
        body: list[nn.Module] = [nn.Conv2d(channels_in, width, 3, padding=1)]
        for _ in range(layers - 2):
            body += [nn.GELU(), nn.Conv2d(width, width, 3, padding=1)]
        body += [nn.GELU(), nn.Conv2d(width, channels_in, 3, padding=1)]
        nn.init.zeros_(body[-1].weight)
        nn.init.zeros_(body[-1].bias)
        self.body = nn.Sequential(*body)

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        return lq + self.body(lq)


def score(net: nn.Module, autoencoder, pairs) -> float:
    """Mean PSNR-Y minus bicubic over (HR, LR) pairs: the LR is PIL-bicubic upsampled, encoded, corrected, decoded."""
    gains = []
    for hr, lr in pairs:
        bic = bicubic_upsample(lr, 4)
        with torch.no_grad():
            z = autoencoder.encode(image_to_tensor(bic)[None] * 2 - 1)
            out = autoencoder.decode(net(z))[0]
        gains.append(psnr_y(hr, tensor_to_image(((out + 1) / 2).clamp(0, 1)), border=4) - psnr_y(hr, bic, border=4))
    return round(float(np.mean(gains)), 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--variants", type=int, default=64, help="K seeded variants per photo (precompute.variants)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    cfg = build_config(argparse.Namespace(resolution=64, width=96, depth=4, heads=4, patch=1, omega=1.0,
                                          distill_method="shortcut", set=[]))
    t0 = time.time()
    hq, lq, _, n_photos = training_set(cfg, a.variants, a.seed)
    held = eval_pairs(cfg, 128, a.seed)
    train_names = [p.name for p in training_photos()][:len(held)]
    seen = eval_pairs(cfg, 128, a.seed, names=train_names)
    report("data", 0, {"photos": n_photos, "rows": int(hq.shape[0]), "holdout": len(held)}, t0)
    ae = build_autoencoder(cfg.autoencoder)
    net = ResidualCNN(hq.shape[1], a.channels, a.layers)
    ema = EMA(net, a.ema)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
    g = torch.Generator().manual_seed(a.seed + 1)
    for step in range(a.steps):
        idx = torch.randint(0, hq.shape[0], (a.batch,), generator=g)
        loss = (net(lq[idx]) - hq[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net)
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            report("regression", step + 1, {"held_out_vs_bicubic": score(ema.module, ae, held),
                                            "training_photos_vs_bicubic": score(ema.module, ae, seen),
                                            "loss": round(loss.item(), 4)}, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
