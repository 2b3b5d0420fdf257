"""FLOPs per training sample of the real presets, counted by torch.utils.flop_counter.FlopCounterMode on the real
module shapes (meta device: no memory, no weights, a few seconds). Used by docs/scale.md.

    .venv/bin/python benchmarks/flops.py [--json] [--mfu 0.4] [--peak-tflops 989]

Counted (batch 1, 2 FLOPs per multiply-add, matmuls/convolutions/attention only -- norms, activations and the
optimizer step are not counted, as usual for MFU):
    dit_fwd          VOSRDiT forward (vosr/model/dit.py, built from the preset by build_dit)
    dit_train        forward + backward of the MSE loss (what one multi-step training sample costs)
    vae_enc          autoencoder encode of HR and LR (2 images; diffusers AutoencoderKL with the SD2.1 VAE config
                     for 0.5B, AutoencoderKLQwenImage default = Qwen-Image config for 1.4B), frozen, no backward
    dino_fwd         DINOv2 ViT-B/14 (0.5B) / ViT-L/14 (1.4B) up to the used block (8 / 17), input 448 x 448 at
                     every crop size (docs/method.md s3), frozen, no backward
    online_train     dit_train + vae_enc + dino_fwd (features computed in the training step, docs/method.md s5)
    dino_cls_full    curation's k-means embedding: the whole ViT's CLS token at 448 (one per crawled image)
    distill          one RCGM distillation sample (docs/method.md s7): teacher 2 fwd (cond + weak), student 2 fwd
                     without grad (N=2 roll-out) and 2 fwd+bwd (base loss at r=t and the RC loss at r)
Then the paper's Table 5 recipe in GPU-days at the stated MFU of the stated dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from vosr.config import config_from_dict  # noqa: E402

# Paper Table 5 / A.3: (stage, crop px, steps, global batch)
RECIPE = [("PT 256px", 256, 400_000, 1024), ("PT 512px", 512, 400_000, 256), ("Distill to one-step", 512, 50_000, 32)]
SD21_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 768}  # stabilityai/stable-diffusion-2-1/vae


def _count(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _cfg(preset: str, res: int):
    return config_from_dict({"preset": preset, "data": {"resolution": res}})


def dit_flops(preset: str, res: int) -> tuple[int, int]:
    from vosr.model.dit import build_dit, model_dims

    cfg = _cfg(preset, res)
    dims = model_dims(cfg)
    model = build_dit(cfg, device="meta", train_grid=dims["train_grid"])
    g = res // dims["downsample"]
    c = dims["latent_channels"]
    z = torch.empty(1, c, g, g, device="meta")
    lq = torch.empty(1, c, g, g, device="meta")
    sem = torch.empty(1, dims["sem_tokens"], dims["sem_dim"], device="meta")
    t = torch.empty(1, device="meta")

    def fwd():
        with torch.no_grad():
            model(z, t, lq, sem)

    def train():
        out = model(z, t, lq, sem)
        loss = (out - z).pow(2).mean()
        loss.backward()

    return _count(fwd), _count(train)


def vae_flops(preset: str, res: int) -> int:
    x = torch.empty(2, 3, res, res, device="meta")  # HR and LR, encoded together (docs/method.md s2)
    with torch.device("meta"):
        if preset == "vosr-0.5b":
            from diffusers import AutoencoderKL

            vae = AutoencoderKL(**SD21_VAE)
            run = lambda: vae.encode(x).latent_dist  # noqa: E731
        else:
            from diffusers import AutoencoderKLQwenImage

            vae = AutoencoderKLQwenImage()
            run = lambda: vae.encode(x.unsqueeze(2)).latent_dist  # noqa: E731
    vae.eval().requires_grad_(False)

    def enc():
        with torch.no_grad():
            run()

    return _count(enc)


def dino_flops(preset: str, res: int) -> int:
    """The semantic encoder as SemanticEncoder runs it (pruned after the used block); its input is the LR resized
    to semantic.input_size (448) whatever the crop size, so `res` does not change the count."""
    from vosr.encoders.semantic import SemanticEncoder, make_vit
    from vosr.encoders.specs import semantic_arch

    cfg = _cfg(preset, res)
    size = int(cfg.semantic.input_size)
    with torch.device("meta"):
        vit = make_vit(semantic_arch(cfg.semantic), size, True)
        enc = SemanticEncoder(cfg.semantic.name, vit, size, cfg.semantic.layer, "", "meta")
    x = torch.empty(1, 3, size, size, device="meta")

    def fwd():
        with torch.no_grad():
            enc.vit.forward_intermediates(x, indices=[enc.layer], norm=False, stop_early=True, output_fmt="NLC",
                                          intermediates_only=True)

    return _count(fwd)


def dino_cls_flops(preset: str) -> int:
    """Curation's balancing embedding (pipelines/curation/semantic_embed.py): the whole ViT's final CLS token,
    one forward per image at semantic.input_size."""
    from vosr.encoders.semantic import make_vit
    from vosr.encoders.specs import semantic_arch

    cfg = _cfg(preset, 512)
    size = int(cfg.semantic.input_size)
    with torch.device("meta"):
        vit = make_vit(semantic_arch(cfg.semantic), size, True).eval()
    x = torch.empty(1, 3, size, size, device="meta")

    def fwd():
        with torch.no_grad():
            vit(x)

    return _count(fwd)


def table(mfu: float, peak_tflops: float) -> dict:
    rows = {}
    for preset in ("vosr-0.5b", "vosr-1.4b"):
        for res in (256, 512):
            fwd, train = dit_flops(preset, res)
            vae = vae_flops(preset, res)
            dino = dino_flops(preset, res)
            rows[f"{preset}@{res}"] = {"dit_fwd": fwd, "dit_train": train, "vae_enc": vae, "dino_fwd": dino,
                                       "online_train": train + vae + dino,
                                       "distill": 4 * fwd + 2 * train}
    curation = {p: {"dino_cls_full": dino_cls_flops(p)} for p in ("vosr-0.5b", "vosr-1.4b")}
    eff = mfu * peak_tflops * 1e12
    for c in curation.values():
        c["gpu_hours_per_100M_images"] = 1e8 * c["dino_cls_full"] / eff / 3600
    recipe = {}
    for preset in ("vosr-0.5b", "vosr-1.4b"):
        stages = []
        for name, res, steps, batch in RECIPE:
            r = rows[f"{preset}@{res}"]
            per = r["distill"] if name.startswith("Distill") else r["dit_train"]
            online = per + r["vae_enc"] + r["dino_fwd"]  # encoders once per sample in every stage
            samples = steps * batch
            stages.append({"stage": name, "res": res, "steps": steps, "batch": batch, "samples": samples,
                           "flops_per_sample_materialised": per, "flops_per_sample_online": online,
                           "gpu_days_materialised": samples * per / eff / 86400,
                           "gpu_days_online": samples * online / eff / 86400})
        recipe[preset] = stages
    return {"mfu": mfu, "peak_tflops": peak_tflops, "per_sample": rows, "recipe": recipe, "curation": curation}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mfu", type=float, default=0.40)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200 SXM)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = table(args.mfu, args.peak_tflops)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    g = 1e9
    print("GFLOPs per training sample (batch 1, FlopCounterMode, 2 FLOPs per MAC)")
    print(f"{'model@px':<16}{'DiT fwd':>10}{'DiT f+b':>10}{'VAE enc x2':>12}{'DINO fwd':>10}{'online':>10}"
          f"{'distill':>10}")
    for k, r in res["per_sample"].items():
        print(f"{k:<16}{r['dit_fwd'] / g:>10.1f}{r['dit_train'] / g:>10.1f}{r['vae_enc'] / g:>12.1f}"
              f"{r['dino_fwd'] / g:>10.1f}{r['online_train'] / g:>10.1f}{r['distill'] / g:>10.1f}")
    for p, c in res["curation"].items():
        print(f"curation CLS embedding ({p} encoder, whole ViT at 448): {c['dino_cls_full'] / g:.1f} GFLOPs/image, "
              f"{c['gpu_hours_per_100M_images']:.1f} GPU-hours per 100M images at the MFU below")
    print(f"\nTable 5 recipe in GPU-days at MFU {args.mfu:.0%} of {args.peak_tflops:g} TFLOP/s "
          "(materialised features / online encoders)")
    for preset, stages in res["recipe"].items():
        for s in stages:
            print(f"{preset:<11}{s['stage']:<22}{s['samples'] / 1e6:>8.1f}M samples "
                  f"{s['gpu_days_materialised']:>8.1f} / {s['gpu_days_online']:>8.1f} GPU-days")
        tm = sum(s["gpu_days_materialised"] for s in stages)
        to = sum(s["gpu_days_online"] for s in stages)
        print(f"{preset:<11}{'total':<22}{'':>18}{tm:>8.1f} / {to:>8.1f} GPU-days")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
