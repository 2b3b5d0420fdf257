"""Serve the upscaler over HTTP with Ray Serve (the one-step student by default).

Stages: start (or join) Ray -> build the application (refused before anything listens: a public bind without a
key) -> deploy it on serve.host:serve.port -> serve until Ctrl-C (then delete the application), or with
--smoke OUT.png send one request, save the answer and stop. Prints a summary JSON at the end.

    python -m inference.serve --config configs/serve/tiny.yaml
    python -m inference.serve --config configs/serve/tiny.yaml --smoke outputs/serve/answer.png
    VOSR_CONFIG=configs/serve/tiny.yaml serve run inference.serve:app
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from ray import serve

from inference.serve.application import start
from inference.serve.auth import load_api_keys
from inference.serve.errors import ServeStartError

ROOT = Path(__file__).resolve().parents[2]


def smoke(cfg, image: str | Path, out: str | Path, timeout_s: float = 300.0) -> dict[str, Any]:
    """Start the service, POST one image, save the PNG answer, stop the application. Returns a summary."""
    import urllib.request

    from PIL import Image

    url = start(cfg)
    try:
        data = Path(image).read_bytes()
        headers = {"Content-Type": "application/octet-stream"}
        keys = load_api_keys(cfg.serve)
        if keys:
            headers["X-API-Key"] = keys[0]
        req = urllib.request.Request(f"{url}/upscale", data=data, headers=headers, method="POST")
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = resp.read()
            status = resp.status
        elapsed = time.perf_counter() - t0
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(body)
        with Image.open(io.BytesIO(body)) as im:
            size = list(im.size)
        with Image.open(image) as im:
            in_size = list(im.size)
        return {"url": url, "status": status, "input": str(image), "input_size": in_size, "output": str(out),
                "output_size": size, "seconds": round(elapsed, 3)}
    finally:
        serve.delete(cfg.serve.app_name)


def default_request(path: Path, size: int = 256, scale: int = 4) -> Path:
    """A small LR request: bicubic x1/scale of the centre crop of the first shipped photo."""
    from PIL import Image

    photo = sorted(q for q in (ROOT / "assets" / "photos").iterdir() if q.suffix.lower() in (".png", ".jpg", ".jpeg"))[0]
    with Image.open(photo) as im:
        im = im.convert("RGB")
        c = min(size, *im.size)
        left, top = (im.width - c) // 2, (im.height - c) // 2
        lr = im.crop((left, top, left + c, top + c)).resize((c // scale, c // scale), Image.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    lr.save(path)
    return path


def serve_until_interrupted(cfg) -> dict[str, Any]:
    url = start(cfg)
    print(f"VOSR upscaler serving at {url}/ (upload page), POST {url}/upscale; Ctrl-C stops", flush=True)
    t0 = time.time()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    serve.delete(cfg.serve.app_name)
    return {"url": url, "served_s": round(time.time() - t0, 1), "stopped": "interrupted"}


def run(cfg, args) -> dict[str, Any]:
    from jobkit.ray_env import init_ray

    started = init_ray(cfg)
    try:
        if args.smoke:
            img = Path(args.image) if args.image else default_request(Path(args.smoke).parent / "request.png")
            return smoke(cfg, img, args.smoke)
        return serve_until_interrupted(cfg)
    finally:
        if started:
            import ray

            serve.shutdown()
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    from jobkit.args import job_main, job_parser

    p = job_parser(__doc__)
    p.add_argument("--smoke", metavar="OUT_PNG", default=None,
                   help="start, upscale one image (--image), save the answer here, stop")
    p.add_argument("--image", default=None,
                   help="LR image for --smoke (default: a 64 px bicubic x1/4 of a shipped photo's centre crop)")
    return job_main(__doc__, argv, run, parser=p, usage_errors=(ServeStartError,))
