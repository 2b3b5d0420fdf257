"""Ray Serve application hosting a VOSR upscaler (the one-step student by default).

Routes (relative to the application's route prefix):
- POST /upscale and POST /   image as the raw body or as multipart/form-data (first file field) -> image/png.
  Query options: mode, steps, guidance, weak_strength, seed, tile, tile_overlap, color_fix (validated; 422).
- GET  /                     the upload page (inference/static/index.html: input and result side by side).
- GET  /healthz              JSON: model, device, request and batch counters.
Errors are JSON {"error": code, "message": ...}: 401 missing/wrong X-API-Key (when serve.api_key is set; every
route except the static page and its script, which hold no data), 413 body or pixel cap, 415 not an image,
400 a corrupt image, 422 bad options, 500 a failure inside the model (the replica keeps serving).

Requests are decoded and validated in the HTTP handler, then go through @serve.batch; inside a batch, images of
the same size with the same sampling options run as one forward pass (seeds and colour fixes may differ per
request, and a result never depends on the batch it was in).

Run: `serve run inference.serve:app` (config from the VOSR_CONFIG env var, else the defaults; overrides from
VOSR_SET="a.b=1;c.d=2"), or `python inference/serve.py --config configs/serve/tiny.yaml` (blocks until Ctrl-C;
`--smoke OUT.png` starts, sends one request, saves the answer and stops).
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation of the routes.
import asyncio
import dataclasses
import hmac
import io
import json
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, Response  # noqa: E402
from ray import serve  # noqa: E402

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}

# query option -> (type, UpscaleOptions field)
QUERY_OPTIONS: dict[str, tuple[type, str]] = {
    "mode": (str, "mode"), "steps": (int, "steps"), "guidance": (float, "guidance"),
    "weak_strength": (float, "weak_strength"), "seed": (int, "seed"), "tile": (int, "tile_size"),
    "tile_overlap": (int, "tile_overlap"), "color_fix": (str, "color_fix"),
}

MIN_TILE = 64  # smaller tiles only multiply the work

fastapi_app = FastAPI(title="VOSR upscaler", docs_url=None, redoc_url=None, openapi_url=None)


class ServeError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.code, "message": self.message}, status_code=self.status)


def parse_query(params, serve_cfg, max_tile: int = 8192) -> dict[str, Any]:
    """Validate the query options into UpscaleOptions overrides; raises ServeError(422)."""
    out: dict[str, Any] = {}
    unknown = sorted(set(params) - set(QUERY_OPTIONS))
    if unknown:
        raise ServeError(422, "bad_option", f"unknown option(s) {unknown}; known: {sorted(QUERY_OPTIONS)}")
    for name, raw in params.items():
        typ, field = QUERY_OPTIONS[name]
        try:
            value = typ(raw)
        except (TypeError, ValueError):
            raise ServeError(422, "bad_option", f"{name}={raw!r} is not a valid {typ.__name__}") from None
        if typ is float and not (value == value and abs(value) != float("inf")):
            raise ServeError(422, "bad_option", f"{name} must be a finite number")
        out[field] = value
    checks = [("steps", 1, serve_cfg.max_steps), ("tile_size", 0, max_tile), ("tile_overlap", 0, max_tile),
              ("guidance", -20.0, 20.0), ("weak_strength", 0.0, 1.0), ("seed", 0, 2**63 - 1)]
    for field, lo, hi in checks:
        if field in out and not lo <= out[field] <= hi:
            raise ServeError(422, "bad_option", f"{field}={out[field]} is out of range [{lo}, {hi}]")
    if out.get("tile_size", 0) and out["tile_size"] < MIN_TILE:
        raise ServeError(422, "bad_option", f"tile={out['tile_size']} must be 0 (off) or >= {MIN_TILE} pixels")
    if "mode" in out and out["mode"] not in ("onestep", "multistep"):
        raise ServeError(422, "bad_option", f"mode={out['mode']!r}; valid: ['onestep', 'multistep']")
    if "color_fix" in out and out["color_fix"] not in ("adain", "wavelet", "none"):
        raise ServeError(422, "bad_option", f"color_fix={out['color_fix']!r}; valid: ['adain', 'wavelet', 'none']")
    return out


def decode_upload(data: bytes, serve_cfg):
    """Bytes -> RGB PIL image with the caps applied; raises ServeError(413/415/400)."""
    from vosr.imageio import NOT_IMAGE_REASONS, ImageDecodeError, decode_image

    if len(data) > serve_cfg.max_body_bytes:
        raise ServeError(413, "too_large", f"body of {len(data)} bytes exceeds {serve_cfg.max_body_bytes} bytes")
    try:
        return decode_image(data, max_pixels=serve_cfg.max_pixels)
    except ImageDecodeError as exc:
        if exc.reason == "too_many_pixels":
            raise ServeError(413, "too_many_pixels", f"image exceeds {serve_cfg.max_pixels} pixels "
                                                     f"({exc.detail})") from None
        if exc.reason in NOT_IMAGE_REASONS:
            raise ServeError(415, "not_an_image", f"the body is not a supported image ({exc.reason})") from None
        raise ServeError(400, "bad_image", f"the image could not be decoded ({exc.reason}: {exc.detail})") from None


@dataclasses.dataclass
class Job:
    image: Any
    overrides: dict[str, Any]


@serve.deployment
@serve.ingress(fastapi_app)
class UpscaleService:
    """One replica: one Upscaler; requests batched by @serve.batch, grouped by size and options."""

    def __init__(self, cfg_dict: dict[str, Any]):
        import torch

        from inference.model_uri import resolve_model
        from vosr.config import config_from_dict
        from vosr.upscaler import Upscaler

        self.cfg = config_from_dict(cfg_dict)
        scfg = self.cfg.serve
        threads = max(1, int(round(scfg.replica_cpus)))
        torch.set_num_threads(threads)
        folder = resolve_model(self.cfg.inference.checkpoint, self.cfg)
        self.upscaler = Upscaler(folder, self.cfg)
        self.defaults = self.upscaler.defaults
        self._run_batch.set_max_batch_size(scfg.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(scfg.batch_wait_timeout_s)
        self.lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.started = time.time()

    # --- helpers ------------------------------------------------------------------------------------------
    def _check_key(self, request: Request) -> None:
        key = self.cfg.serve.api_key
        if not key:
            return
        sent = request.headers.get("x-api-key", "")
        if not sent:
            raise ServeError(401, "missing_api_key", "this service needs an X-API-Key header")
        if not hmac.compare_digest(sent.encode(), key.encode()):
            raise ServeError(401, "bad_api_key", "the X-API-Key header is not valid")

    async def _read_body(self, request: Request) -> bytes:
        cap = self.cfg.serve.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap + 64 * 1024:  # multipart framing allowance
            raise ServeError(413, "too_large", f"body of {declared} bytes exceeds {cap} bytes")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=4, max_fields=16)
            except Exception as exc:  # noqa: BLE001 - starlette raises several parse errors
                raise ServeError(400, "bad_multipart", f"could not parse the multipart body: {exc}") from None
            for _, value in form.multi_items():
                if hasattr(value, "read"):
                    data = await value.read()
                    await form.close()
                    return data
            await form.close()
            raise ServeError(415, "not_an_image", "the multipart body holds no file field")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > cap:
                raise ServeError(413, "too_large", f"body exceeds {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _compute(self, jobs: list[Job]) -> list[bytes]:
        """Same-size, same-option jobs in one forward pass; PNG bytes per job."""
        first = jobs[0].overrides
        shared = {k: v for k, v in first.items() if k not in ("seed", "color_fix")}
        opts = self.upscaler.resolve(self.defaults, **shared)
        seeds = [j.overrides.get("seed", self.defaults.seed) for j in jobs]
        fixes = [j.overrides.get("color_fix", self.defaults.color_fix) for j in jobs]
        images = self.upscaler.upscale_batch([j.image for j in jobs], opts, seeds=seeds, color_fixes=fixes)
        out = []
        for img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=3)
            out.append(buf.getvalue())
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _run_batch(self, jobs: list[Job]) -> list[tuple[int, Any]]:
        with self.lock:
            self.batch_sizes[len(jobs)] += 1
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            shared = tuple(sorted((k, v) for k, v in job.overrides.items() if k not in ("seed", "color_fix")))
            groups[(job.image.size, shared)].append(i)
        results: list[tuple[int, Any]] = [(500, "not run")] * len(jobs)
        for idxs in groups.values():
            try:
                pngs = await asyncio.to_thread(self._compute, [jobs[i] for i in idxs])
                for i, png in zip(idxs, pngs):
                    results[i] = (200, png)
            except ValueError as exc:  # options the loaded model cannot honour (e.g. multistep on a student)
                for i in idxs:
                    results[i] = (422, str(exc))
            except Exception as exc:  # noqa: BLE001 - one failing group must not fail the others
                for i in idxs:
                    results[i] = (500, f"{type(exc).__name__}: {exc}")
        return results

    async def _upscale(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            self._check_key(request)
            overrides = parse_query(request.query_params, self.cfg.serve)
            if overrides:
                self.upscaler.resolve(self.defaults, **{k: v for k, v in overrides.items()})
            data = await self._read_body(request)
            image = decode_upload(data, self.cfg.serve)
        except ServeError as exc:
            self._count(f"http_{exc.status}")
            return exc.response()
        except ValueError as exc:
            self._count("http_422")
            return ServeError(422, "bad_option", str(exc)).response()
        status, payload = await self._run_batch(Job(image, overrides))
        if status != 200:
            self._count(f"http_{status}")
            code = "bad_option" if status == 422 else "internal_error"
            return JSONResponse({"error": code, "message": payload}, status_code=status)
        self._count("http_200")
        w, h = image.size
        u = overrides.get("upscale", self.defaults.upscale)
        headers = {"X-Input-Size": f"{w}x{h}", "X-Output-Size": f"{w * u}x{h * u}",
                   "X-Elapsed-Ms": f"{(time.perf_counter() - t0) * 1000:.1f}"}
        return Response(content=payload, media_type="image/png", headers=headers)

    def _count(self, key: str) -> None:
        with self.lock:
            self.stats[key] += 1

    # --- routes -------------------------------------------------------------------------------------------
    @fastapi_app.post("/upscale")
    async def upscale(self, request: Request) -> Response:
        return await self._upscale(request)

    @fastapi_app.post("/")
    async def upscale_root(self, request: Request) -> Response:
        return await self._upscale(request)

    @fastapi_app.get("/healthz")
    async def healthz(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except ServeError as exc:
            return exc.response()
        with self.lock:
            stats = dict(self.stats)
            batches = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        return JSONResponse({"status": "ok", "model": self.upscaler.describe(), "requests": stats,
                             "batch_sizes": batches, "max_batch_size": self.cfg.serve.max_batch_size,
                             "uptime_s": round(time.time() - self.started, 1)})

    @fastapi_app.get("/")
    async def page(self) -> Response:
        return FileResponse(STATIC / "index.html", media_type=STATIC_FILES["index.html"])

    @fastapi_app.get("/static/{name}")
    async def static(self, name: str) -> Response:
        if name not in STATIC_FILES or not (STATIC / name).is_file():
            return JSONResponse({"error": "not_found", "message": f"no static file {name!r}"}, status_code=404)
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])


# --- application construction -----------------------------------------------------------------------------------

def _absolute_paths(cfg):
    """Replicas run in other working folders: make local paths absolute in the driver."""
    d = cfg.to_dict()
    ckpt = d["inference"]["checkpoint"]
    if ckpt and "://" not in ckpt and not ckpt.startswith("models:/") and not ckpt.startswith("runs:/"):
        d["inference"]["checkpoint"] = str(Path(ckpt).expanduser().resolve())
    d["run"]["output_root"] = str(Path(d["run"]["output_root"]).expanduser().resolve())
    for section in ("autoencoder", "semantic"):
        if d[section].get("path"):
            d[section]["path"] = str(Path(d[section]["path"]).expanduser().resolve())
    return d


def build_app(cfg):
    """The bound Serve application for a Config."""
    s = cfg.serve
    if s.min_replicas > s.max_replicas:
        raise ValueError(f"serve.min_replicas ({s.min_replicas}) > serve.max_replicas ({s.max_replicas})")
    deployment = UpscaleService.options(
        name="UpscaleService",
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        max_ongoing_requests=max(s.max_ongoing_requests, s.max_batch_size),
        ray_actor_options={"num_cpus": s.replica_cpus, "num_gpus": s.replica_gpus},
    )
    return deployment.bind(_absolute_paths(cfg))


def config_from_env():
    from vosr.config import load_config

    overrides = [x for x in os.environ.get("VOSR_SET", "").split(";") if x.strip()]
    return load_config(os.environ.get("VOSR_CONFIG") or None, overrides)


def _ray_init(cfg) -> bool:
    """Join a cluster (RAY_ADDRESS / run.ray.address) or start a local Ray; True when started here."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.run.ray.address or os.environ.get("RAY_ADDRESS"):
        from pipelines.ray_env import init_ray

        init_ray(cfg)
        return False
    # address="local": a new instance with our caps, even when another local cluster's address file exists
    from pipelines.ray_env import start_local_ray

    kwargs: dict[str, Any] = {}
    if cfg.run.ray.num_cpus:
        kwargs["num_cpus"] = cfg.run.ray.num_cpus
    if cfg.run.ray.object_store_memory_mb:
        kwargs["object_store_memory"] = cfg.run.ray.object_store_memory_mb * 2**20
    start_local_ray({"PYTHONPATH": str(ROOT)}, **kwargs)  # dashboard-less, quiet workers (pipelines/ray_env.py)
    return True


def start(cfg, blocking: bool = False) -> str:
    """Start Serve on serve.host:serve.port and deploy the app; returns its base URL."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix, blocking=blocking)
    prefix = cfg.serve.route_prefix.rstrip("/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}{prefix}"


def smoke(cfg, image: str | Path, out: str | Path, timeout_s: float = 300.0) -> dict[str, Any]:
    """Start the service, POST one image, save the PNG answer, stop the application. Returns a summary."""
    import urllib.request

    from PIL import Image

    url = start(cfg)
    try:
        data = Path(image).read_bytes()
        headers = {"Content-Type": "application/octet-stream"}
        if cfg.serve.api_key:
            headers["X-API-Key"] = cfg.serve.api_key
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


def main(argv: list[str] | None = None) -> int:
    from vosr.jobargs import job_parser, parse_job_args

    p = job_parser(__doc__.split("\n")[0])
    p.add_argument("--smoke", metavar="OUT_PNG", default=None,
                   help="start, upscale one image (--image), save the answer here, stop")
    p.add_argument("--image", default=None,
                   help="LR image for --smoke (default: a 64 px bicubic x1/4 of a shipped photo's centre crop)")
    cfg, args = parse_job_args(__doc__.split("\n")[0], argv, parser=p)
    started = _ray_init(cfg)
    try:
        if args.smoke:
            img = Path(args.image) if args.image else default_request(Path(args.smoke).parent / "request.png")
            summary = smoke(cfg, img, args.smoke)
            print(json.dumps(summary, indent=2))
            return 0
        url = start(cfg)
        print(f"VOSR upscaler serving at {url}/ (upload page), POST {url}/upscale; Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping", flush=True)
        serve.delete(cfg.serve.app_name)
        return 0
    finally:
        if started:
            import ray

            serve.shutdown()
            ray.shutdown()


def _app_from_env():
    try:
        return build_app(config_from_env())
    except Exception as exc:  # noqa: BLE001 - `import inference.serve` must work even with a bad VOSR_CONFIG
        print(f"inference.serve: could not build the app from VOSR_CONFIG: {exc}", file=sys.stderr)
        return None


app = _app_from_env()


if __name__ == "__main__":
    # run the importable module's main, so replicas unpickle its classes by name
    from inference.serve import main as _main

    raise SystemExit(_main())
