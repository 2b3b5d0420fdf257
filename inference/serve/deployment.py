"""The Serve deployments: an HTTP ingress and the model behind it.

UpscaleService (the ingress, FastAPI): the key, the query options, the streaming body and its decoding (in a worker
thread), then one call of UpscaleModel through a DeploymentHandle, and the PNG encoding of the answer (in a worker
thread). It loads no model (no torch), so it stays up when a model replica dies: a call that fails because its
replica died or was unreachable (Ray's actor errors) is sent again, to a live replica or to the replacement Serve
starts, until the request's deadline (serve.request_timeout_s + serve.body_timeout_s from its arrival, queueing
included); a request still waiting for a model replica then (none alive, a replacement loading, or all busy) is
answered 503 with Retry-After, never 500. A model replica answers 504 itself when a request takes longer than
serve.request_timeout_s from when it reached the replica. An upscale is a pure function of (image, options, seed),
so the retried answer is the same image.

UpscaleModel: one Upscaler per replica, doing only what must be done there: the options are resolved and the cost
checked, then the request joins a batch (inference/serve/batching.py: a batch forms when the model is free); inside
a batch, images of the same size with the same sampling options run as one forward pass in a worker thread (seeds
and colour fixes may differ per request; a result depends on its batch only through float rounding, at most one
grey level in a few pixels). It answers RGB pixels; decoding and PNG encoding run in the ingress, in parallel with
the forward passes.

Readiness: GET /readyz (no key: it holds no data) answers 200 only when a model replica answers through the same
handle /upscale uses, i.e. when /upscale is routed (same application, same ingress) and a replica has loaded the
model; else 503 with Retry-After. GET /healthz (with the key) adds the counters and answers 503 in the same case.
"""

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
from inference.serve.batching import Batcher
from inference.serve.body import read_body
from inference.serve.errors import ServeError, request_id
from inference.serve.limits import (
    UpscaleQuery,
    check_cost,
    decode_upload,
    option_errors,
    page_options,
    query_overrides,
)

STATIC = Path(__file__).resolve().parents[1] / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
READY_PROBE_S = 2.0            # how long /readyz and /healthz wait for a model replica's answer
RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)   # waits between the attempts of a model call whose replica died

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
    """Behaviour injected into the model replicas (build_app's `hooks`); this default does nothing. The tests inject
    faults through it (tests/helpers/serve_faults.py): a subclass must be importable by the replicas."""

    def after_load(self) -> None:
        """Called at the end of a model replica's constructor, after the model is loaded."""

    async def before_batch(self, item: UpscaleItem) -> None:
        """Awaited on the replica's event loop after the request is validated, before it joins a batch."""

    def before_model(self, items: list[UpscaleItem]) -> None:
        """Called in the worker thread just before the model runs these items as one forward pass."""


def _model_unavailable_errors() -> tuple[type[BaseException], ...]:
    """What a handle call raises when its replica died or could not be reached, or when the deployment has no
    replica to take it: a retry may succeed."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    errors: list[type[BaseException]] = [RayActorError, DeploymentUnavailableError]
    try:
        from ray.serve.exceptions import ReplicaUnavailableError
        errors.append(ReplicaUnavailableError)
    except ImportError:  # pragma: no cover - older Ray
        pass
    return tuple(errors)


@serve.deployment
class UpscaleModel:
    """One replica: one Upscaler; requests batched by inference.serve.batching.Batcher, grouped by size and
    options."""

    def __init__(self, cfg_dict: dict[str, Any], hooks: Hooks | None = None):
        import torch

        from inference.model_uri import resolve_model
        from jobkit.config import config_from_dict
        from vosr.config.redact import RedactingFilter
        from vosr.upscaler import Upscaler

        logger.addFilter(RedactingFilter())      # no credentials in the replica log
        self.cfg = config_from_dict(cfg_dict)
        self.hooks = hooks or Hooks()
        scfg = self.cfg.serve
        torch.set_num_threads(max(1, int(round(scfg.replica_cpus))))
        folder = resolve_model(self.cfg.inference.checkpoint, self.cfg)
        self.upscaler = Upscaler(folder, self.cfg)
        self.defaults = self.upscaler.resolve(self.upscaler.defaults)
        self.forced_tile = self.cfg.inference.tile_size or scfg.max_tile
        self.batcher = Batcher(self._run_batch, scfg.max_batch_size, scfg.batch_wait_timeout_s)
        self.lock = threading.Lock()
        self.batch_sizes: Counter[int] = Counter()
        self.seconds: Counter[str] = Counter()   # where this replica's time goes (model_time in /healthz)
        self.started = time.time()
        self.hooks.after_load()

    def _effective(self, opts, size: tuple[int, int]):
        """Options as run: tiling forced above serve.force_tile_pixels upscaled pixels."""
        w, h = size
        if opts.tile_size == 0 and w * h * opts.upscale ** 2 > self.cfg.serve.force_tile_pixels:
            opts = opts.replace(tile_size=self.forced_tile)
        return opts

    def _compute(self, items: list[UpscaleItem]) -> list[Any]:
        """Same-size, same-option items in one forward pass; an RGB uint8 array (H x W x 3) per item (the ingress
        encodes the PNG, off this replica's one-batch-at-a-time path)."""
        import numpy as np

        self.hooks.before_model(items)
        opts = items[0].options
        t0, c0 = time.perf_counter(), time.thread_time()
        images = self.upscaler.upscale_batch([j.image for j in items], opts, seeds=[j.options.seed for j in items],
                                             color_fixes=[j.options.color_fix for j in items])
        out = [np.asarray(img, dtype=np.uint8) for img in images]
        self._account(forward_s=time.perf_counter() - t0, forward_cpu_s=time.thread_time() - c0)
        return out

    def _account(self, **seconds: float) -> None:
        with self.lock:
            for k, v in seconds.items():
                self.seconds[k] += v

    async def _run_batch(self, items: list[UpscaleItem]) -> list[Any]:
        """One batch from the Batcher: groups of the same size and sampling options, each one forward pass in a
        worker thread; a failing group's items get a 500 (the others are served)."""
        with self.lock:
            self.batch_sizes[len(items)] += 1
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[(item.image.size, item.options.batch_key())].append(i)
        results: list[Any] = [None] * len(items)
        for idxs in groups.values():
            group = [items[i] for i in idxs]
            try:
                outputs = await asyncio.to_thread(self._compute, group)
                for i, pixels in zip(idxs, outputs):
                    results[i] = pixels
            except Exception:  # noqa: BLE001 - one failing group must not fail the others
                # options were validated before the batch: whatever fails here is the server's fault (500)
                logger.exception("request(s) %s failed inside the model run",
                                 ", ".join(j.request_id for j in group))
                for i in idxs:
                    results[i] = ServeError(500, "internal_error", "the server failed to process this request; "
                                            "quote the request id when reporting it")
        return results

    async def upscale(self, pixels, overrides: dict[str, Any], rid: str):
        """An RGB image (uint8 array, H x W x 3) and its validated query overrides -> (the upscaled RGB uint8 array,
        {"mode", "steps"} as run);
        raises ServeError: 422 options this model cannot honour or too costly, 413 over the budget, 504 past
        serve.request_timeout_s from here, 500 a failure inside the model run (logged here with the request id)."""
        from PIL import Image

        timeout_s = self.cfg.serve.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    opts = self.upscaler.resolve(self.defaults, **overrides)
                except ValueError as exc:  # options the loaded model cannot honour (e.g. multistep on a student)
                    raise ServeError(422, "bad_option", str(exc)) from None
                image = Image.fromarray(pixels, "RGB")
                opts = self._effective(opts, image.size)
                plan = self.upscaler.plan(image.size, opts)
                default_plan = self.upscaler.plan(image.size, self._effective(self.defaults, image.size))
                check_cost(plan, default_plan, self.cfg.serve)
                item = UpscaleItem(image, opts, rid)
                await self.hooks.before_batch(item)
                return await self.batcher.submit(item), {"mode": opts.mode, "steps": opts.steps}
        except TimeoutError:
            logger.warning("request %s timed out after %s s", rid, timeout_s)
            raise ServeError(504, "timeout", f"the request took longer than {timeout_s:g} s") from None

    async def info(self) -> dict[str, Any]:
        """The loaded model (no local paths) and this replica's batch counters."""
        with self.lock:
            batches = {str(k): v for k, v in sorted(self.batch_sizes.items())}
            seconds = {k: round(v, 4) for k, v in sorted(self.seconds.items())}
        seconds["batch_wait_s"] = round(self.batcher.wait_seconds, 4)
        model = {k: v for k, v in self.upscaler.describe().items() if k != "checkpoint"}
        source = self.cfg.inference.checkpoint
        if source.startswith(("models:/", "runs:/")):
            model["registry_uri"] = source
        return {"model": model, "batch_sizes": batches, "model_time": seconds,
                "options": page_options(self.upscaler, self.defaults, self.cfg.serve),
                "uptime_s": round(time.time() - self.started, 1)}


# Defined before @serve.ingress below, which freezes (pickles) a copy of the app and of the class's globals as
# they are then: the exception handler and the helpers the routes use.
@fastapi_app.exception_handler(RequestValidationError)
async def _refused_options(request: Request, exc: RequestValidationError) -> Response:
    """FastAPI's refusal of the query options, in this service's error format (see inference/serve/__init__.py)."""
    service = serve.get_replica_context().servable_object   # the UpscaleService instance of this replica
    return service.refuse_options(request, option_errors(exc.errors()))


def _decode_pixels(data: bytes, scfg):
    """Body bytes -> (uint8 H x W x 3 array, (w, h)) with the caps applied; raises ServeError(413/415/400)."""
    import numpy as np

    image = decode_upload(data, scfg)
    return np.asarray(image, dtype=np.uint8), image.size


def _encode_png(pixels) -> bytes:
    """An RGB uint8 array -> PNG bytes (zlib level 3)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


class _Attempts:
    """What happened to one request's model calls (for the answer at its deadline)."""

    def __init__(self):
        self.retries = 0
        self.last_error = ""


@serve.deployment
@serve.ingress(fastapi_app)
class UpscaleService:
    """The HTTP ingress: checks and reads each request, calls UpscaleModel, retries a call whose replica died."""

    def __init__(self, cfg_dict: dict[str, Any], key_digests: list[str] | None, model):
        from jobkit.config import config_from_dict
        from vosr.config.redact import RedactingFilter

        logger.addFilter(RedactingFilter())
        self.cfg = config_from_dict(cfg_dict)
        self.keys = KeyCheck(key_digests)
        self.model = model                      # DeploymentHandle of UpscaleModel
        self.unavailable = _model_unavailable_errors()
        self.lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self.started = time.time()
        self.options_cache: dict[str, Any] | None = None     # GET /options, from a model replica

    def _count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] += n

    def _unavailable(self, why: str) -> ServeError:
        retry = self.cfg.serve.retry_after_s
        return ServeError(503, "unavailable", f"no model replica could take this request in time ({why}); retry "
                          f"after {retry:g} s", headers={"Retry-After": f"{retry:g}"})

    async def _call_model(self, pixels, overrides: dict[str, Any], rid: str, attempts: _Attempts):
        """UpscaleModel.upscale, sent again while its replica dies or cannot be reached (the caller's deadline
        bounds the attempts)."""
        from ray.serve.exceptions import BackPressureError

        while True:
            response = self.model.upscale.remote(pixels, overrides, rid)
            try:
                result = await response
            except asyncio.CancelledError:      # the deadline passed or the client left: free the model's slot
                response.cancel()
                raise
            except ServeError:
                raise
            except BackPressureError:
                raise ServeError(503, "overloaded", "the model's queue is full; retry later",
                                 headers={"Retry-After": f"{self.cfg.serve.retry_after_s:g}"}) from None
            except self.unavailable as exc:
                attempts.last_error = type(exc).__name__
                wait = RETRY_BACKOFF_S[min(attempts.retries, len(RETRY_BACKOFF_S) - 1)]
                attempts.retries += 1
                self._count("model_retries")
                logger.warning("request %s: model replica unavailable (%s); attempt %d in %.1f s", rid,
                               attempts.last_error, attempts.retries + 1, wait)
                await asyncio.sleep(wait)
                continue
            return result

    async def _upscale(self, request: Request, query: UpscaleQuery) -> Response:
        t0 = time.perf_counter()
        rid = request_id(request)
        scfg = self.cfg.serve
        attempts = _Attempts()
        deadline_s = scfg.request_timeout_s + scfg.body_timeout_s    # queueing and retries included
        try:
            async with asyncio.timeout(deadline_s):
                self.keys.check(request.headers)
                overrides = query_overrides(query, scfg)
                data = await read_body(request, scfg.max_body_bytes, scfg.body_timeout_s)
                pixels, size = await asyncio.to_thread(_decode_pixels, data, scfg)
                upscaled, ran = await self._call_model(pixels, overrides, rid, attempts)
                png = await asyncio.to_thread(_encode_png, upscaled)
        except ServeError as exc:
            self._count(f"http_{exc.status}")
            return exc.response(rid)
        except TimeoutError:
            # A model replica answers 504 itself past serve.request_timeout_s; this deadline comes later, so the
            # request spent it waiting for a model replica (none alive, a replacement loading, or all busy): a
            # server condition the client may retry, not a slow request.
            self._count("http_503")
            why = (f"{attempts.retries} attempts failed, the last with {attempts.last_error}" if attempts.retries
                   else "it waited for a model replica")
            logger.warning("request %s: no model replica served it within %s s (%s)", rid, deadline_s, why)
            return self._unavailable(f"{why} for {deadline_s:g} s").response(rid)
        except Exception:  # noqa: BLE001 - never the exception text to the client
            logger.exception("request %s failed", rid)
            self._count("http_500")
            return ServeError(500, "internal_error", "the server failed to process this request; quote the "
                              "request id when reporting it").response(rid)
        self._count("http_200")
        out_size = (upscaled.shape[1], upscaled.shape[0])
        headers = {"X-Input-Size": f"{size[0]}x{size[1]}", "X-Output-Size": f"{out_size[0]}x{out_size[1]}",
                   "X-Mode": ran["mode"], "X-Steps": str(ran["steps"]),
                   "X-Elapsed-Ms": f"{(time.perf_counter() - t0) * 1000:.1f}"}
        if attempts.retries:
            headers["X-Retries"] = str(attempts.retries)
        return Response(content=png, media_type="image/png", headers=headers)

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

    async def _model_info(self) -> tuple[dict[str, Any] | None, str]:
        """A model replica's info() within READY_PROBE_S, or (None, why not)."""
        response = self.model.info.remote()
        try:
            async with asyncio.timeout(READY_PROBE_S):
                return await response, ""
        except TimeoutError:
            response.cancel()
            return None, f"no model replica answered within {READY_PROBE_S:g} s (loading or restarting)"
        except self.unavailable as exc:
            return None, f"no model replica ({type(exc).__name__})"

    # --- routes -------------------------------------------------------------------------------------------
    @fastapi_app.post("/upscale")
    async def upscale(self, request: Request, query: Annotated[UpscaleQuery, Query()]) -> Response:
        return await self._upscale(request, query)

    @fastapi_app.post("/")
    async def upscale_root(self, request: Request, query: Annotated[UpscaleQuery, Query()]) -> Response:
        return await self._upscale(request, query)

    @fastapi_app.get("/readyz")
    async def readyz(self) -> Response:
        info, why = await self._model_info()
        if info is None:
            return JSONResponse({"status": "not_ready", "reason": why}, status_code=503,
                                headers={"Retry-After": f"{self.cfg.serve.retry_after_s:g}"})
        return JSONResponse({"status": "ready"})

    @fastapi_app.get("/healthz")
    async def healthz(self, request: Request) -> Response:
        try:
            self.keys.check(request.headers)
        except ServeError as exc:
            return exc.response()
        info, why = await self._model_info()
        with self.lock:
            stats = dict(self.stats)
        s = self.cfg.serve
        limits = {"max_body_bytes": s.max_body_bytes, "max_pixels": s.max_pixels, "max_steps": s.max_steps,
                  "min_tile": s.min_tile, "max_tile": s.max_tile, "force_tile_pixels": s.force_tile_pixels,
                  "max_evaluations": s.max_evaluations, "max_cost_ratio": s.max_cost_ratio,
                  "request_timeout_s": s.request_timeout_s, "body_timeout_s": s.body_timeout_s}
        body = {"status": "ok" if info else "not_ready", "limits": limits, "requests": stats,
                "max_batch_size": s.max_batch_size, "uptime_s": round(time.time() - self.started, 1)}
        if info is None:
            return JSONResponse({**body, "reason": why}, status_code=503,
                                headers={"Retry-After": f"{s.retry_after_s:g}"})
        return JSONResponse({**body, "model": info["model"], "batch_sizes": info["batch_sizes"],
                             "model_time": info["model_time"]})

    @fastapi_app.get("/options")
    async def options(self) -> Response:
        """The choices the upload page offers (no key needed: like the page, it holds no data): the modes this
        model runs, its default steps and the server's limits (from a model replica, kept once known: they change
        only with a redeploy, which replaces this replica too)."""
        if self.options_cache is None:
            info, why = await self._model_info()
            if info is None:
                return JSONResponse({"error": "unavailable", "message": why}, status_code=503,
                                    headers={"Retry-After": f"{self.cfg.serve.retry_after_s:g}"})
            self.options_cache = info["options"]
        return JSONResponse(self.options_cache)

    @fastapi_app.get("/")
    async def page(self) -> Response:
        return FileResponse(STATIC / "index.html", media_type=STATIC_FILES["index.html"])

    @fastapi_app.get("/static/{name}")
    async def static(self, name: str) -> Response:
        if name not in STATIC_FILES or not (STATIC / name).is_file():
            return JSONResponse({"error": "not_found", "message": f"no static file {name!r}"}, status_code=404)
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])

