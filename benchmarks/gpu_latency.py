"""End-to-end VOSR latency on a GPU: LR pixels -> SR pixels, one-step student and 25-step guided teacher.

    python benchmarks/gpu_latency.py                       # vosr-0.5b, 512x512 output, bf16, batch 1, CUDA
    python benchmarks/gpu_latency.py --decoder full        # full SD2.1 VAE decoder instead of the light one
    python benchmarks/gpu_latency.py --compile             # torch.compile the DiT blocks (as the reference)
    python benchmarks/gpu_latency.py --device cpu --preset tiny --size 64 --iters 2   # CPU smoke run

Everything is built from configs with RANDOM weights (timings do not depend on the values): the DiT (teacher and
student) from the preset, DINOv2 ViT-B/14 through vosr.encoders with semantic.allow_random, the SD2.1 VAE as
diffusers AutoencoderKL built from its public config dict, and the light decoder (docs/method.md s2: SD2 decoder with
halved channels, fed z/0.18215 without post_quant_conv), which is what the reference uses at inference.
If diffusers is not installed the VAE encode/decode stages are SKIPPED (random latents feed the DiT) and the output
says so. Pipeline per image (docs/method.md s8): bicubic x4 upsample -> VAE encode (posterior sample) -> DINOv2 on the
448x448 resize -> DiT (one step: z0 = z1 - f(z1, 1, 0); multi-step: 25 Euler steps, both guidance branches in one
doubled batch = 50 NFEs) -> decode -> clamp. Paper (A100, fp16): 0.094 s one-step, 1.226 s 25-step.
Goal on an H100: <= 0.05 s and <= 0.6 s. This script imports neither Ray nor MLflow.
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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vosr.config import config_from_dict  # noqa: E402
from vosr.encoders import autoencoder_spec, build_autoencoder, build_semantic_encoder  # noqa: E402
from vosr.flow import sample_fewstep, sample_multistep  # noqa: E402
from vosr.model import build_dit  # noqa: E402

PAPER_A100 = {"one_step_s": 0.094, "multi_step_25_s": 1.226}  # paper, Table 2 timings (A100)
H100_GOAL = {"one_step_s": 0.05, "multi_step_25_s": 0.6}
SD21_VAE = dict(  # public config of stabilityai/stable-diffusion-2-1 vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, act_fn="silu", norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=768, scaling_factor=0.18215)
SD_SCALE = 0.18215


class RandomSD21:
    """SD2.1-shaped VAE with random weights: encode = posterior sample x 0.18215; light or full decoder."""

    def __init__(self, device, dtype, decoder: str):
        from diffusers import AutoencoderKL
        from diffusers.models.autoencoders.vae import Decoder

        self.vae = AutoencoderKL(**SD21_VAE).to(device, dtype).eval()
        self.decoder_kind = decoder
        if decoder == "light":  # halved channels, 3 resnets per up block, single-head mid attention (docs/method.md s2)
            self.light = Decoder(in_channels=4, out_channels=3, up_block_types=("UpDecoderBlock2D",) * 4,
                                 block_out_channels=(64, 128, 256, 256), layers_per_block=2, norm_num_groups=32,
                                 act_fn="silu").to(device, dtype).eval()

    def encode(self, x, generator=None):
        return self.vae.encode(x).latent_dist.sample(generator) * SD_SCALE

    def decode(self, z):
        if self.decoder_kind == "light":
            return self.light(z / SD_SCALE)
        return self.vae.decode(z / SD_SCALE).sample


def build(args, device, dtype):
    overrides = [f"data.resolution={args.size}"]
    if args.preset != "tiny":
        overrides.append("semantic.allow_random=true")
    cfg = config_from_dict({"preset": args.preset}, overrides)
    torch.manual_seed(0)
    teacher = build_dit(cfg).to(device, dtype).eval()
    student = build_dit(cfg, student=True).to(device, dtype).eval()
    if args.compile:
        for m in (teacher, student):
            for blk in m.blocks:
                blk.compile()
    sem_enc = build_semantic_encoder(cfg.semantic, device).to(dtype)
    spec = autoencoder_spec(cfg.autoencoder)
    vae, note = None, ""
    if cfg.autoencoder.name == "pixel":
        vae = build_autoencoder(cfg.autoencoder, device)
        note = "pixel codec (tiny preset)"
    elif cfg.autoencoder.name == "sd21":
        try:
            vae = RandomSD21(device, dtype, args.decoder)
            note = f"SD2.1 VAE (random), {args.decoder} decoder"
        except ImportError:
            note = "VAE encode/decode SKIPPED: diffusers is not installed here; totals EXCLUDE the VAE"
    else:
        note = f"VAE {cfg.autoencoder.name} not built by this benchmark; totals EXCLUDE the VAE"
    return cfg, teacher, student, sem_enc, vae, spec, note


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vosr-0.5b")
    p.add_argument("--size", type=int, default=512, help="output (HR) size in pixels; LR is size/4")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=0.5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--decoder", default="light", choices=["light", "full"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg, teacher, student, sem_enc, vae, spec, note = build(args, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    lr = torch.rand(1, 3, args.size // 4, args.size // 4, generator=g, device=device)
    lat = args.size // spec.downsample

    def stages(sampler: str) -> dict[str, float]:
        times: dict[str, float] = {}
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            up, times["upsample"] = timed(lambda: F.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1),
                                          device)
            if vae is not None:
                lq, times["vae_encode"] = timed(lambda: vae.encode((up * 2 - 1).to(dtype), generator=g), device)
            else:
                lq = torch.randn(1, spec.latent_channels, lat, lat, device=device, generator=g)
            lq = lq.to(dtype)
            sem, times["semantic"] = timed(lambda: sem_enc(up).to(dtype), device)
            noise = torch.randn(lq.shape, device=device, generator=g).to(dtype)
            if sampler == "one":
                z0, times["dit"] = timed(lambda: sample_fewstep(student, lq, sem, 1, noise=noise), device)
            else:
                z0, times["dit"] = timed(lambda: sample_multistep(teacher, lq, sem, args.steps, "linear",
                                                                  args.guidance, 0.15, noise=noise), device)
            if vae is not None:
                _, times["decode"] = timed(lambda: vae.decode(z0.to(dtype)).clamp(-1, 1), device)
        times["total"] = sum(times.values())
        return times

    results = {}
    for sampler in ("one", "multi"):
        runs = []
        for i in range(args.warmup + args.iters):
            t = stages(sampler)
            if i >= args.warmup:
                runs.append(t)
        results[sampler] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    one, multi = results["one"]["total"], results["multi"]["total"]
    summary = {
        "device": dev_name, "torch": torch.__version__, "preset": args.preset, "size": args.size,
        "dtype": args.dtype, "compile": args.compile, "batch": 1, "weights": "random", "vae": note,
        "one_step_s": round(one, 4), f"multi_step_{args.steps}_s": round(multi, 4),
        "stages_one_step_s": {k: round(v, 4) for k, v in results["one"].items()},
        f"stages_multi_step_{args.steps}_s": {k: round(v, 4) for k, v in results["multi"].items()},
        "paper_a100_s": PAPER_A100, "h100_goal_s": H100_GOAL,
        "one_step_vs_goal": round(one / H100_GOAL["one_step_s"], 3),
        "multi_step_vs_goal": round(multi / H100_GOAL["multi_step_25_s"], 3) if args.steps == 25 else None,
        "one_step_vs_paper_a100": round(one / PAPER_A100["one_step_s"], 3),
        "multi_step_vs_paper_a100": round(multi / PAPER_A100["multi_step_25_s"], 3) if args.steps == 25 else None,
    }
    print(f"device {dev_name}  preset {args.preset}  {args.size}x{args.size}  {args.dtype}  batch 1  ({note})")
    print(f"one-step   : {one:8.4f} s   paper A100 {PAPER_A100['one_step_s']:.3f} s   "
          f"H100 goal {H100_GOAL['one_step_s']:.3f} s")
    print(f"{args.steps}-step guided: {multi:8.4f} s   paper A100 {PAPER_A100['multi_step_25_s']:.3f} s   "
          f"H100 goal {H100_GOAL['multi_step_25_s']:.3f} s")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
