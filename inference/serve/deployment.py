"""The Serve deployment: one replica holds one Upscaler; requests are decoded and validated in the HTTP handler
(decoding in a worker thread), then go through @serve.batch; inside a batch, images of the same size with the same
sampling options run as one forward pass in a worker thread (seeds and colour fixes may differ per request, and a
result never depends on the batch it was in beyond float rounding)."""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation of the routes.
import asyncio
import dataclasses
import io
import logging
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from ray import serve

from inference.serve.auth import KeyCheck
from inference.serve.body import read_body
from inference.serve.errors import ServeError, request_id
from inference.serve.limits import UpscaleQuery, check_cost, decode_upload, option_errors, query_overrides

STATIC = Path(__file__).resolve().parents[1] / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}

logger = logging.getLogger("ray.serve")  # inside a replica: the replica's log file

fastapi_app = FastAPI(title="VOSR upscaler", docs_url=None, redoc_url=None, openapi_url=None)


@dataclasses.dataclass
class UpscaleItem:
    """One request's share of a batch: its decoded image and its resolved options (seed and colour fix may differ
    between the items of one forward pass)."""

    image: Any
    options: Any      # resolved UpscaleOptions
    request_id: str


class Hooks:
    """Behaviour injected into a replica (build_app's `hooks`); this default does nothing. The tests inject faults
    through it (tests/helpers/serve_faults.py): a subclass must be importable by the replicas."""

    async def before_batch(self, item: UpscaleItem) -> None:
        """Awaited on the replica's event loop after the request is validated, before it joins a batch."""

    def before_model(self, items: list[UpscaleItem]) -> None:
        """Called in the worker thread just before the model runs these items as one forward pass."""


# registered before @serve.ingress below, which freezes (pickles) a copy of the app as it is then
@fastapi_app.exception_handler(RequestValidationError)
async def _refused_options(request: Request, exc: RequestValidationError) -> Response:
    """FastAPI's refusal of the query options, in this service's error format (see inference/serve/__init__.py)."""
    service = serve.get_replica_context().servable_object   # the UpscaleService instance of this replica
    return service.refuse_options(request, option_errors(exc.errors()))


@serve.deployment
@serve.ingress(fastapi_app)
class UpscaleService:
    """One replica: one Upscaler; requests batched by @serve.batch, grouped by size and options."""

    def __init__(self, cfg_dict: dict[str, Any], key_digests: list[str] | None = None, hooks: Hooks | None = None):
        import torch

        from inference.model_uri import resolve_model
        from jobkit.config import config_from_dict
        from vosr.config.redact import RedactingFilter
        from vosr.upscaler import Upscaler

        logger.addFilter(RedactingFilter())      # no credentials in the replica log
        self.cfg = config_from_dict(cfg_dict)
        self.keys = KeyCheck(key_digests)
        self.hooks = hooks or Hooks()
        scfg = self.cfg.serve
        threads = max(1, int(round(scfg.replica_cpus)))
        torch.set_num_threads(threads)
        folder = resolve_model(self.cfg.inference.checkpoint, self.cfg)
        self.upscaler = Upscaler(folder, self.cfg)
        self.defaults = self.upscaler.resolve(self.upscaler.defaults)
        self.forced_tile = self.cfg.inference.tile_size or scfg.max_tile
        self._run_batch.set_max_batch_size(scfg.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(scfg.batch_wait_timeout_s)
        self.lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.started = time.time()

    # --- helpers ------------------------------------------------------------------------------------------
    def _effective(self, opts, size: tuple[int, int]):
        """Options as run: tiling forced above serve.force_tile_pixels upscaled pixels."""
        w, h = size
        if opts.tile_size == 0 and w * h * opts.upscale ** 2 > self.cfg.serve.force_tile_pixels:
            opts = opts.replace(tile_size=self.forced_tile)
        return opts

    def _compute(self, items: list[UpscaleItem]) -> list[bytes]:
        """Same-size, same-option items in one forward pass; PNG bytes per item."""
        self.hooks.before_model(items)
        opts = items[0].options
        images = self.upscaler.upscale_batch([j.image for j in items], opts, seeds=[j.options.seed for j in items],
                                             color_fixes=[j.options.color_fix for j in items])
        out = []
        for img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=3)
            out.append(buf.getvalue())
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _run_batch(self, items: list[UpscaleItem]) -> list[tuple[int, Any]]:
        with self.lock:
            self.batch_sizes[len(items)] += 1
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[(item.image.size, item.options.batch_key())].append(i)
        results: list[tuple[int, Any]] = [(500, None)] * len(items)
        for idxs in groups.values():
            group = [items[i] for i in idxs]
            try:
                pngs = await asyncio.to_thread(self._compute, group)
                for i, png in zip(idxs, pngs):
                    results[i] = (200, png)
            except Exception:  # noqa: BLE001 - one failing group must not fail the others
                # options were validated before the batch: whatever fails here is the server's fault (500)
                logger.exception("request(s) %s failed inside the model run",
                                 ", ".join(j.request_id for j in group))
        return results

    async def _prepare(self, request: Request, query: UpscaleQuery, rid: str) -> UpscaleItem:
        """Everything before the model: key, options, body, decoding, cost; raises ServeError."""
        scfg = self.cfg.serve
        self.keys.check(request.headers)
        overrides = query_overrides(query, scfg)
        try:
            opts = self.upscaler.resolve(self.defaults, **overrides)
        except ValueError as exc:  # options the loaded model cannot honour (e.g. multistep on a student)
            raise ServeError(422, "bad_option", str(exc)) from None
        data = await read_body(request, scfg.max_body_bytes, scfg.body_timeout_s)
        image = await asyncio.to_thread(decode_upload, data, scfg)
        opts = self._effective(opts, image.size)
        plan = self.upscaler.plan(image.size, opts)
        default_plan = self.upscaler.plan(image.size, self._effective(self.defaults, image.size))
        check_cost(plan, default_plan, scfg)
        item = UpscaleItem(image, opts, rid)
        await self.hooks.before_batch(item)
        return item

    async def _upscale(self, request: Request, query: UpscaleQuery) -> Response:
        t0 = time.perf_counter()
        rid = request_id(request)
        try:
            async with asyncio.timeout(self.cfg.serve.request_timeout_s):
                item = await self._prepare(request, query, rid)
                status, payload = await self._run_batch(item)
        except ServeError as exc:
            self._count(f"http_{exc.status}")
            return exc.response(rid)
        except TimeoutError:
            self._count("http_504")
            logger.warning("request %s timed out after %s s", rid, self.cfg.serve.request_timeout_s)
            return ServeError(504, "timeout", f"the request took longer than {self.cfg.serve.request_timeout_s} s"
                              ).response(rid)
        except Exception:  # noqa: BLE001 - never the exception text to the client
            logger.exception("request %s failed", rid)
            status, payload = 500, None
        if status != 200:
            self._count(f"http_{status}")
            return ServeError(500, "internal_error", "the server failed to process this request; quote the "
                              "request id when reporting it").response(rid)
        self._count("http_200")
        w, h = item.image.size
        u = item.options.upscale
        headers = {"X-Input-Size": f"{w}x{h}", "X-Output-Size": f"{w * u}x{h * u}",
                   "X-Elapsed-Ms": f"{(time.perf_counter() - t0) * 1000:.1f}"}
        return Response(content=payload, media_type="image/png", headers=headers)

    def _count(self, key: str) -> None:
        with self.lock:
            self.stats[key] += 1

    def refuse_options(self, request: Request, message: str) -> Response:
        """The answer to options FastAPI refused: 401 first when the key is missing or wrong (as for every other
        error), else 422 bad_option; counted and with the request id like the handler's own errors."""
        error = ServeError(422, "bad_option", message)
        try:
            self.keys.check(request.headers)
        except ServeError as exc:
            error = exc
        self._count(f"http_{error.status}")
        return error.response(request_id(request))

    # --- routes -------------------------------------------------------------------------------------------
    @fastapi_app.post("/upscale")
    async def upscale(self, request: Request, query: Annotated[UpscaleQuery, Query()]) -> Response:
        return await self._upscale(request, query)

    @fastapi_app.post("/")
    async def upscale_root(self, request: Request, query: Annotated[UpscaleQuery, Query()]) -> Response:
        return await self._upscale(request, query)

    @fastapi_app.get("/healthz")
    async def healthz(self, request: Request) -> Response:
        try:
            self.keys.check(request.headers)
        except ServeError as exc:
            return exc.response()
        with self.lock:
            stats = dict(self.stats)
            batches = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        model = {k: v for k, v in self.upscaler.describe().items() if k != "checkpoint"}  # no local paths
        source = self.cfg.inference.checkpoint
        if source.startswith(("models:/", "runs:/")):
            model["registry_uri"] = source
        s = self.cfg.serve
        limits = {"max_body_bytes": s.max_body_bytes, "max_pixels": s.max_pixels, "max_steps": s.max_steps,
                  "min_tile": s.min_tile, "max_tile": s.max_tile, "force_tile_pixels": s.force_tile_pixels,
                  "max_evaluations": s.max_evaluations, "max_cost_ratio": s.max_cost_ratio,
                  "request_timeout_s": s.request_timeout_s, "body_timeout_s": s.body_timeout_s}
        return JSONResponse({"status": "ok", "model": model, "limits": limits, "requests": stats,
                             "batch_sizes": batches, "max_batch_size": s.max_batch_size,
                             "uptime_s": round(time.time() - self.started, 1)})

    @fastapi_app.get("/")
    async def page(self) -> Response:
        return FileResponse(STATIC / "index.html", media_type=STATIC_FILES["index.html"])

    @fastapi_app.get("/static/{name}")
    async def static(self, name: str) -> Response:
        if name not in STATIC_FILES or not (STATIC / name).is_file():
            return JSONResponse({"error": "not_found", "message": f"no static file {name!r}"}, status_code=404)
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])
