"""Seams of the tiled autoencoder passes (vosr/encoders/tiled.py): decode and encode a large image whole and in
tiles with an SD2.1-shaped VAE, and report how the tiled result differs from the whole one on the blend regions
between tiles (the seams) and elsewhere (vosr.encoders.tiled.seam_report), with the time of each pass.

    python benchmarks/bench_vae_tiling.py                       # 1024 px, 512 px tiles, random SD2.1-shaped VAE
    python benchmarks/bench_vae_tiling.py --vae-path DIR        # real SD2.1 VAE weights (diffusers layout)

With random weights the decoder's output is not a photo, so the numbers say how much tiles disturb this network,
not how visible seams are on real outputs; run it with the real VAE (--vae-path) for that.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_upscale_memory import SD21_VAE

    from jobkit.config import config_from_dict
    from vosr.encoders import build_autoencoder
    from vosr.encoders.tiled import seam_report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--tiles", type=int, nargs="+", default=[512, 256])
    p.add_argument("--vae-path", default="")
    args = p.parse_args(argv)
    path = args.vae_path
    if not path:
        from diffusers import AutoencoderKL

        path = tempfile.mkdtemp(prefix="vosr-vae-")
        torch.manual_seed(0)
        AutoencoderKL(**SD21_VAE).save_pretrained(path)
    codec = build_autoencoder(config_from_dict({}, ["preset=vosr-0.5b", f"autoencoder.path={path}"]).autoencoder)
    photo = sorted((ROOT / "assets" / "photos").glob("*.png"))[0]
    img = Image.open(photo).convert("RGB").resize((args.size, args.size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    out = {"vae": "given" if args.vae_path else "random SD2.1-shaped", "size": args.size, "rows": []}
    with torch.inference_mode():
        t0 = time.perf_counter()
        z = codec.encode(x, sample=False)
        whole = codec.decode(z)
        out["whole_s"] = round(time.perf_counter() - t0, 2)
        for tile in args.tiles:
            t0 = time.perf_counter()
            zt = codec.encode(x, sample=False, tile=tile)
            dec = codec.decode(z, tile=tile)
            row = {"tile_px": tile, "seconds": round(time.perf_counter() - t0, 2),
                   "latent_mae_tiled_vs_whole": round(float((zt - z).abs().mean()), 5),
                   "latent_std": round(float(z.std()), 5), "decode": seam_report(dec, whole, tile, 8)}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
