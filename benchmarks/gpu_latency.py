"""End-to-end VOSR latency on a GPU: LR pixels -> SR pixels, one-step student and 25-step guided teacher.

    python benchmarks/gpu_latency.py                       # vosr-0.5b and vosr-1.4b, 512x512 output, bf16, CUDA
    python benchmarks/gpu_latency.py --compile             # inference.compile: blocks compiled, dynamic shapes
    python benchmarks/gpu_latency.py --presets vosr-0.5b --decoder full   # full SD2.1 decoder (needs diffusers)
    python benchmarks/gpu_latency.py --smoke               # CPU smoke run: tiny preset, 64 px, 2 steps, fp32
    python benchmarks/gpu_latency.py --device cpu --dtype fp32 --size 64 --steps 2 --warmup 0 --iters 1 \
        --set model.depth=1                                # CPU check of both real presets' code paths

Activation checkpointing is a training option (it is off without gradients); gpu_train_throughput.py takes it.
Everything is built from configs with RANDOM weights (timings do not depend on the values): the DiT (teacher and
student) from the preset, DINOv2 (ViT-B/14 for 0.5B, ViT-L/14 for 1.4B) through vosr.encoders with
semantic.allow_random; for vosr-0.5b the SD2.1 VAE as diffusers AutoencoderKL built from its public config dict and
the light decoder (docs/method.md s2: SD2 decoder with halved channels, fed z/0.18215 without post_quant_conv), which
is what the reference uses at inference; for vosr-1.4b the 2D Qwen-Image VAE of vosr/encoders/qwen2d.py (plain
PyTorch; its posterior is sampled here from the encoder's mean and log-variance). If diffusers is not installed the
0.5B VAE stages are SKIPPED (random latents feed the DiT) and the output says so. Pipeline per image (docs/method.md s8): bicubic x4 upsample -> VAE encode (posterior sample) -> DINOv2 on the
448x448 resize -> DiT (one step: z0 = z1 - f(z1, 1, 0); multi-step: 25 Euler steps, both guidance branches in one
doubled batch = 50 NFEs) -> decode -> clamp. Paper (A100, fp16): 0.094 s one-step, 1.226 s 25-step.
Goal on an H100: <= 0.05 s and <= 0.6 s. This script imports neither Ray nor MLflow; on a machine with only torch,
timm and torchvision it runs with the 0.5B VAE stages skipped (said in its output). One run prints every preset.
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
from vosr.model import build_dit, compile_dit  # noqa: E402

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


class RandomQwen2D:
    """The 2D Qwen-Image VAE (vosr/encoders/qwen2d.py) with random weights: encode = a posterior sample from the
    encoder's mean and log-variance (no diffusers needed); decode clamps to [-1, 1]. The per-channel latent
    normalisation of the real wrapper (two element-wise ops) is left out."""

    def __init__(self, device, dtype):
        from vosr.encoders.qwen2d import QwenImageVAE2D

        self.vae = QwenImageVAE2D().to(device, dtype).eval()

    def encode(self, x, generator=None):
        mean, logvar = self.vae.quant_conv(self.vae.encoder(x)).chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device).to(mean.dtype)
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise

    def decode(self, z):
        return self.vae.decode(z)


def build(args, preset, device, dtype):
    overrides = [f"data.resolution={args.size}", *args.set]
    if preset != "tiny":
        overrides.append("semantic.allow_random=true")
    cfg = config_from_dict({"preset": preset}, overrides)
    torch.manual_seed(0)
    teacher = build_dit(cfg).to(device, dtype).eval()
    student = build_dit(cfg, student=True).to(device, dtype).eval()
    if args.compile:  # as inference.compile does (vosr/upscaler.py)
        for m in (teacher, student):
            compile_dit(m, dynamic=True)
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
    elif cfg.autoencoder.name == "qwen2d":
        vae = RandomQwen2D(device, dtype)
        note = "Qwen-Image 2D VAE (random)"
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="vosr-0.5b,vosr-1.4b", help="comma-separated presets, run in turn")
    p.add_argument("--size", type=int, default=512, help="output (HR) size in pixels; LR is size/4")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=0.5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--decoder", default="light", choices=["light", "full"])
    p.add_argument("--compile", action="store_true", help="inference.compile: torch.compile the blocks (dynamic)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every preset (e.g. model.depth=1 for a CPU check of the real presets)")
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny preset, 64 px, 2 steps, fp32, 1 iter")
    args = p.parse_args(argv)
    if args.smoke:
        args.presets, args.size, args.steps, args.device, args.dtype, args.warmup, args.iters = \
            "tiny", 64, 2, "cpu", "fp32", 1, 1
    return args


def run_preset(args, preset: str, device: torch.device, dtype: torch.dtype) -> dict:
    cfg, teacher, student, sem_enc, vae, spec, note = build(args, preset, device, dtype)
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

    results, first_s = {}, {}
    for sampler in ("one", "multi"):
        runs = []
        for i in range(args.warmup + args.iters):
            t = stages(sampler)
            if i == 0:
                first_s[sampler] = round(t["total"], 3)   # includes any compile
            if i >= args.warmup:
                runs.append(t)
        results[sampler] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    one, multi = results["one"]["total"], results["multi"]["total"]
    n = args.steps
    return {
        "preset": preset, "size": args.size, "dtype": args.dtype, "compile": args.compile, "batch": 1,
        "weights": "random", "vae": note, "one_step_s": round(one, 4), f"multi_step_{n}_s": round(multi, 4),
        "first_call_s": first_s,
        "stages_one_step_s": {k: round(v, 4) for k, v in results["one"].items()},
        f"stages_multi_step_{n}_s": {k: round(v, 4) for k, v in results["multi"].items()},
        "one_step_vs_goal": round(one / H100_GOAL["one_step_s"], 3),
        "multi_step_vs_goal": round(multi / H100_GOAL["multi_step_25_s"], 3) if n == 25 else None,
        "one_step_vs_paper_a100": round(one / PAPER_A100["one_step_s"], 3),
        "multi_step_vs_paper_a100": round(multi / PAPER_A100["multi_step_25_s"], 3) if n == 25 else None,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU; this benchmark needs one (or run --smoke on the CPU)"}))
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        row = run_preset(args, preset, device, dtype)
        rows.append(row)
        print(f"{preset:>10} {args.size}x{args.size} {args.dtype} batch 1 compile={args.compile} ({row['vae']})\n"
              f"  one-step   : {row['one_step_s']:8.4f} s   paper A100 {PAPER_A100['one_step_s']:.3f} s   "
              f"H100 goal {H100_GOAL['one_step_s']:.3f} s\n"
              f"  {args.steps}-step guided: {row[f'multi_step_{args.steps}_s']:8.4f} s   paper A100 "
              f"{PAPER_A100['multi_step_25_s']:.3f} s   H100 goal {H100_GOAL['multi_step_25_s']:.3f} s", flush=True)
        del row
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({"benchmark": "gpu_latency", "device": dev_name, "torch": torch.__version__,
                      "paper_a100_s": PAPER_A100, "h100_goal_s": H100_GOAL, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
