"""Ray Serve application hosting a VOSR upscaler (the one-step student by default).

Routes (relative to the application's route prefix):
- POST /upscale and POST /   image as the raw body or as multipart/form-data (first file field) -> image/png.
  Query options (UpscaleQuery): mode, steps, guidance, weak_strength, seed, tile, tile_overlap, color_fix. FastAPI
  validates their types, static bounds and names (vosr.choices) and refuses unknown ones; the bounds taken from
  serve.* (max_steps, min_tile, max_tile, half a tile of overlap) are checked in the handler, since FastAPI fixes
  its bounds at import and the config arrives with the replica. Either way the answer is the one error format.
- GET  /                     the upload page (inference/static/index.html: input and result side by side, a
                             before/after slider, mode and steps within the limits of GET /options).
- GET  /options              JSON: the modes the model runs, default and maximum steps, tile bounds (no key).
- GET  /healthz              JSON: model (no local paths), limits, request and batch counters.
Errors are JSON {"error": code, "message": ..., "request_id": ...} (the X-Request-Id Ray Serve answers with), never
FastAPI's {"detail": [...]}: a refused option is {"error": "bad_option", "message": "steps='0': Input should be
greater than or equal to 1", ...}, one "name=value: reason" per refused option, joined by "; ".
401 missing/wrong X-API-Key (every route except the static page, its script and /options, which hold no data), 408 a body
not read within serve.body_timeout_s (or the proxy's request timeout), 413 a body over serve.max_body_bytes
(counted while streaming, raw and multipart alike), too many pixels or a request over serve.max_evaluations,
415 not an image, 400 a corrupt image, 422 bad options or options costing more than serve.max_cost_ratio x the
defaults on the same image, 503 + Retry-After when the queue is full, 504 past serve.request_timeout_s, 500 a
failure inside the model: a generic message with the request id; the replica logs the traceback with that id.

Cost model (before any work): a request costs tiles x steps x guidance passes model evaluations (vosr.upscaler
.CostPlan; a tile larger than the default options' evaluation counts by its area ratio). Tiles are bounded by
serve.min_tile / serve.max_tile, the overlap by half a tile (vosr.tiling), and tiling is forced above
serve.force_tile_pixels upscaled pixels, so no query option costs more than serve.max_cost_ratio x the defaults.

Authentication: keys come from the environment variable serve.api_key_env, the file serve.api_key_file (one per
line) or a config file's serve.api_key, never from argv; only their SHA-256 digests reach the replicas, compared
in constant time. Binding a non-loopback host without a key refuses to start unless serve.allow_anonymous.

Requests are decoded and validated in the HTTP handler (decoding in a worker thread), then go through
@serve.batch; inside a batch, images of the same size with the same sampling options run as one forward pass in a
worker thread (seeds and colour fixes may differ per request, and a result never depends on the batch it was in).

Run: `serve run inference.serve:app` (config from the VOSR_CONFIG env var, else the defaults; overrides from
VOSR_SET="a.b=1;c.d=2"), or `python inference/serve.py --config configs/serve/tiny.yaml` (blocks until Ctrl-C;
`--smoke OUT.png` starts, sends one request, saves the answer and stops).
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation of the routes.
import asyncio
import dataclasses
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.config import BackpressureConfig

from vosr.choices import COLOR_FIXES, MODES

ROOT = Path(__file__).resolve().parents[1]
STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}

MULTIPART_SLACK = 64 * 1024  # multipart framing and non-file fields allowed on top of the file's max_body_bytes
FAULT_RAISE_SEED, FAULT_SLEEP_SEED = 2**62 + 13, 2**62 + 14  # serve.fault_injection (tests only)

logger = logging.getLogger("ray.serve")  # inside a replica: the replica's log file

fastapi_app = FastAPI(title="VOSR upscaler", docs_url=None, redoc_url=None, openapi_url=None)


class ServeError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.extra = extra

    def response(self, request_id: str = "") -> JSONResponse:
        body = {"error": self.code, "message": self.message, **self.extra}
        if request_id:
            body["request_id"] = request_id   # Ray Serve's proxy sends the same id as X-Request-Id
        return JSONResponse(body, status_code=self.status, headers=self.headers)


_REQUEST_ID_OK = frozenset("0123456789abcdefABCDEF-")


def request_id(request: Request) -> str:
    """The id Ray Serve's proxy gave this request (its X-Request-Id answer header and its replica log lines), or
    a fresh one when the header is missing or not a plain hex/uuid token (it may come from the client)."""
    rid = request.headers.get("x-request-id", "")
    if 8 <= len(rid) <= 64 and set(rid) <= _REQUEST_ID_OK:
        return rid
    return uuid.uuid4().hex


class ServeStartError(RuntimeError):
    """The service refuses to start with this configuration (e.g. a public bind without a key)."""


# --- authentication ----------------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def key_digest(key: str | bytes) -> str:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def load_api_keys(scfg, environ: dict[str, str] | None = None) -> list[str]:
    """The raw API keys from serve.api_key_env (environment), serve.api_key_file (one per line, # comments) and a
    config file's serve.api_key; in the process that builds the app only."""
    env = os.environ if environ is None else environ
    keys: list[str] = []
    if scfg.api_key:
        keys.append(scfg.api_key)
    if scfg.api_key_env and env.get(scfg.api_key_env, "").strip():
        keys.append(env[scfg.api_key_env].strip())
    if scfg.api_key_file:
        path = Path(scfg.api_key_file).expanduser()
        if not path.is_file():
            raise ServeStartError(f"serve.api_key_file {path} does not exist")
        lines = [x.strip() for x in path.read_text().splitlines()]
        file_keys = [x for x in lines if x and not x.startswith("#")]
        if not file_keys:
            raise ServeStartError(f"serve.api_key_file {path} holds no key")
        keys += file_keys
    for k in keys:
        if len(k) < 16:
            raise ServeStartError("an API key must have at least 16 characters")
    return keys


def access_digests(cfg, environ: dict[str, str] | None = None) -> list[str]:
    """SHA-256 digests of the API keys; refuses a non-loopback bind without a key (serve.allow_anonymous opts out)."""
    s = cfg.serve
    digests = sorted({key_digest(k) for k in load_api_keys(s, environ)})
    if not digests and not is_loopback(s.host) and not s.allow_anonymous:
        raise ServeStartError(
            f"refusing to serve on {s.host!r} (not loopback) without an API key: set the environment variable "
            f"{s.api_key_env or 'named by serve.api_key_env'} or serve.api_key_file (a Kubernetes Secret), or opt "
            "out explicitly with serve.allow_anonymous: true")
    return digests


# --- request validation ------------------------------------------------------------------------------------------

class UpscaleQuery(BaseModel):
    """The query options of POST /upscale and POST /, validated by FastAPI before the handler runs: types, the
    static bounds, the names of vosr.choices and no unknown option. The bounds read from serve.* are checked by
    query_overrides in the replica (FastAPI's bounds are fixed when this module is imported, the config is not)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal[MODES] | None = None
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=-20.0, le=20.0, allow_inf_nan=False)
    weak_strength: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    tile: int | None = Field(None, ge=0)
    tile_overlap: int | None = Field(None, ge=0)
    color_fix: Literal[COLOR_FIXES] | None = None


def option_errors(errors) -> str:
    """Pydantic's (FastAPI's) validation errors as one line naming each option, e.g. "steps='0': Input should be
    greater than or equal to 1"."""
    return "; ".join(f"{e['loc'][-1]}={e.get('input')!r}: {e['msg']}" for e in errors)


def query_overrides(query: UpscaleQuery, serve_cfg) -> dict[str, Any]:
    """The options sent, as UpscaleOptions overrides, within the config's bounds; raises ServeError(422)."""
    out = query.model_dump(exclude_none=True)
    tile, overlap, steps = out.get("tile", 0), out.get("tile_overlap", 0), out.get("steps", 1)
    if steps > serve_cfg.max_steps:
        raise ServeError(422, "bad_option", f"steps={steps} exceeds serve.max_steps ({serve_cfg.max_steps})")
    if tile and not serve_cfg.min_tile <= tile <= serve_cfg.max_tile:
        raise ServeError(422, "bad_option", f"tile={tile} must be 0 (off) or within [{serve_cfg.min_tile}, "
                         f"{serve_cfg.max_tile}] pixels")
    if overlap > (tile or serve_cfg.max_tile) // 2:
        raise ServeError(422, "bad_option", f"tile_overlap={overlap} exceeds half the tile "
                         f"({(tile or serve_cfg.max_tile) // 2})")
    if "tile" in out:
        out["tile_size"] = out.pop("tile")
    return out


def parse_query(params, serve_cfg) -> dict[str, Any]:
    """Raw query options (a mapping of strings) -> UpscaleOptions overrides, as the endpoint validates them."""
    try:
        query = UpscaleQuery.model_validate(dict(params))
    except ValidationError as exc:
        raise ServeError(422, "bad_option", option_errors(exc.errors())) from None
    return query_overrides(query, serve_cfg)


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


def check_cost(plan, default_plan, serve_cfg) -> dict[str, Any]:
    """Refuse, before any work, a request costing more than serve.max_cost_ratio x the defaults on the same image
    (422) or more than serve.max_evaluations (413). Returns the numbers."""
    ref = default_plan.area
    cost, base = plan.cost(ref), default_plan.cost(ref)
    numbers = {"evaluations": plan.evaluations, "tiles": plan.tiles, "steps": plan.steps, "passes": plan.passes,
               "cost": round(cost, 2), "default_cost": round(base, 2), "ratio": round(cost / base, 3),
               "max_cost_ratio": serve_cfg.max_cost_ratio, "max_evaluations": serve_cfg.max_evaluations}
    where = (f"{plan.tiles} tiles x {plan.steps} steps x {plan.passes} passes = {plan.evaluations} evaluations"
             + (f" of {plan.area / ref:.2f}x the default's area" if plan.area > ref else ""))
    if cost > serve_cfg.max_evaluations:
        raise ServeError(413, "over_budget", f"{where}: cost {cost:.0f} exceeds the budget of "
                         f"{serve_cfg.max_evaluations} model evaluations per request", cost=numbers)
    if cost > serve_cfg.max_cost_ratio * base + 1e-9:
        raise ServeError(422, "too_costly", f"{where}: cost {cost:.0f} is {cost / base:.2f}x the default options' "
                         f"{base:.0f} on this image; the limit is {serve_cfg.max_cost_ratio}x", cost=numbers)
    return numbers


class _Multipart:
    """Streaming multipart/form-data: the first part with a filename (else the first part), capped while it
    arrives."""

    def __init__(self, boundary: bytes, cap: int):
        from python_multipart.multipart import MultipartParser

        self.cap = cap
        self.parts: list[tuple[bool, bytearray]] = []
        self._field = bytearray()
        self._value = bytearray()
        self._is_file = False
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_header_field": self._hfield,
            "on_header_value": self._hvalue, "on_header_end": self._hend})

    def _begin(self):
        self._is_file = False
        self.parts.append((False, bytearray()))

    def _hfield(self, data, start, end):
        self._field += data[start:end]

    def _hvalue(self, data, start, end):
        self._value += data[start:end]

    def _hend(self):
        if self._field.lower() == b"content-disposition" and b"filename=" in self._value.lower():
            self.parts[-1] = (True, self.parts[-1][1])
        self._field, self._value = bytearray(), bytearray()

    def _data(self, data, start, end):
        buf = self.parts[-1][1]
        buf += data[start:end]
        if len(buf) > self.cap:
            raise ServeError(413, "too_large", f"a multipart field exceeds {self.cap} bytes")

    def feed(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def file(self) -> bytes:
        self.parser.finalize()
        files = [bytes(b) for is_file, b in self.parts if is_file]
        if not files:
            raise ServeError(415, "not_an_image", "the multipart body holds no file field")
        return files[0]


async def read_body(request: Request, cap: int, timeout_s: float) -> bytes:
    """The request body (a raw image, or the first file of a multipart form), refused with 413 as soon as more
    than `cap` bytes (file) / `cap` + MULTIPART_SLACK (whole multipart body) have arrived, and with 408 when the
    body has not arrived within `timeout_s`. The 413 says how many bytes were read and the size of the last chunk
    (uvicorn hands over what arrived since the last read, at most about its 64 KiB flow-control mark plus a recv)."""
    from python_multipart.multipart import parse_options_header

    ctype = request.headers.get("content-type", "")
    multipart = None
    limit = cap
    if ctype.lower().startswith("multipart/form-data"):
        boundary = parse_options_header(ctype)[1].get(b"boundary")
        if not boundary:
            raise ServeError(400, "bad_multipart", "multipart/form-data without a boundary")
        multipart, limit = _Multipart(boundary, cap), cap + MULTIPART_SLACK
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, "too_large", f"body of {declared} bytes exceeds {limit} bytes", bytes_read=0)
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise ServeError(413, "too_large", f"body exceeds {limit} bytes", bytes_read=total,
                                     last_chunk=len(chunk))
                if multipart is not None:
                    try:
                        multipart.feed(chunk)
                    except ServeError as exc:
                        exc.extra.update(bytes_read=total, last_chunk=len(chunk))
                        raise
                    except Exception as exc:  # noqa: BLE001 - the parser raises several error types
                        raise ServeError(400, "bad_multipart", f"could not parse the multipart body: "
                                         f"{type(exc).__name__}") from None
                else:
                    chunks.append(chunk)
    except TimeoutError:
        raise ServeError(408, "body_timeout", f"the body did not arrive within {timeout_s} s "
                         f"({total} bytes read)") from None
    if multipart is not None:
        try:
            return multipart.file()
        except ServeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ServeError(400, "bad_multipart", f"could not parse the multipart body: {type(exc).__name__}") \
                from None
    return b"".join(chunks)


def page_options(upscaler, defaults, serve_cfg) -> dict[str, Any]:
    """Modes the loaded checkpoint runs (a student: one-step; a teacher: multi-step), their default steps, and the
    bounds the endpoint enforces (steps <= serve.max_steps, tiles within [min_tile, max_tile])."""
    mode = "onestep" if upscaler.is_student else "multistep"
    steps = upscaler.onestep_steps if upscaler.is_student else upscaler.multistep_steps
    return {"modes": {m: m == mode for m in MODES}, "mode": mode, "default_steps": min(steps, serve_cfg.max_steps),
            "max_steps": serve_cfg.max_steps, "min_tile": serve_cfg.min_tile, "max_tile": serve_cfg.max_tile,
            "seed": defaults.seed, "color_fix": defaults.color_fix}


@dataclasses.dataclass
class Job:
    image: Any
    options: Any      # resolved UpscaleOptions (seed and colour fix per job)
    request_id: str


# registered before @serve.ingress below, which freezes (pickles) a copy of the app as it is then
@fastapi_app.exception_handler(RequestValidationError)
async def _refused_options(request: Request, exc: RequestValidationError) -> Response:
    """FastAPI's refusal of the query options, in this service's error format (see the module docstring)."""
    service = serve.get_replica_context().servable_object   # the UpscaleService instance of this replica
    return service.refuse_options(request, option_errors(exc.errors()))


@serve.deployment
@serve.ingress(fastapi_app)
class UpscaleService:
    """One replica: one Upscaler; requests batched by @serve.batch, grouped by size and options."""

    def __init__(self, cfg_dict: dict[str, Any], key_digests: list[str] | None = None):
        import torch

        from inference.model_uri import resolve_model
        from jobkit.config import config_from_dict
        from vosr.config.redact import RedactingFilter
        from vosr.upscaler import Upscaler

        logger.addFilter(RedactingFilter())      # no credentials in the replica log
        self.cfg = config_from_dict(cfg_dict)
        self.key_digests = [bytes.fromhex(d) for d in (key_digests or [])]
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
    def _check_key(self, request: Request) -> None:
        if not self.key_digests:
            return
        sent = request.headers.get("x-api-key", "")
        if not sent:
            raise ServeError(401, "missing_api_key", "this service needs an X-API-Key header")
        digest = hashlib.sha256(sent.encode()).digest()
        ok = False
        for known in self.key_digests:  # every digest compared, in constant time
            ok |= hmac.compare_digest(digest, known)
        if not ok:
            raise ServeError(401, "bad_api_key", "the X-API-Key header is not valid")

    def _effective(self, opts, size: tuple[int, int]):
        """Options as run: tiling forced above serve.force_tile_pixels upscaled pixels."""
        w, h = size
        if opts.tile_size == 0 and w * h * opts.upscale ** 2 > self.cfg.serve.force_tile_pixels:
            opts = opts.replace(tile_size=self.forced_tile)
        return opts

    def _compute(self, jobs: list[Job]) -> list[bytes]:
        """Same-size, same-option jobs in one forward pass; PNG bytes per job."""
        opts = jobs[0].options
        if self.cfg.serve.fault_injection and any(j.options.seed == FAULT_RAISE_SEED for j in jobs):
            raise RuntimeError("fault injection: secret /internal/path must not reach the client")
        images = self.upscaler.upscale_batch([j.image for j in jobs], opts, seeds=[j.options.seed for j in jobs],
                                             color_fixes=[j.options.color_fix for j in jobs])
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
            groups[(job.image.size, job.options.batch_key())].append(i)
        results: list[tuple[int, Any]] = [(500, None)] * len(jobs)
        for idxs in groups.values():
            group = [jobs[i] for i in idxs]
            try:
                pngs = await asyncio.to_thread(self._compute, group)
                for i, png in zip(idxs, pngs):
                    results[i] = (200, png)
            except Exception:  # noqa: BLE001 - one failing group must not fail the others
                # options were validated before the batch: whatever fails here is the server's fault (500)
                logger.exception("request(s) %s failed inside the model run",
                                 ", ".join(j.request_id for j in group))
        return results

    async def _prepare(self, request: Request, query: UpscaleQuery, rid: str) -> Job:
        """Everything before the model: key, options, body, decoding, cost; raises ServeError."""
        scfg = self.cfg.serve
        self._check_key(request)
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
        if scfg.fault_injection and opts.seed == FAULT_SLEEP_SEED:  # a model run that outlives the deadline
            await asyncio.sleep(scfg.request_timeout_s + scfg.body_timeout_s + 1)
        return Job(image, opts, rid)

    async def _upscale(self, request: Request, query: UpscaleQuery) -> Response:
        t0 = time.perf_counter()
        rid = request_id(request)
        try:
            async with asyncio.timeout(self.cfg.serve.request_timeout_s):
                job = await self._prepare(request, query, rid)
                status, payload = await self._run_batch(job)
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
        w, h = job.image.size
        u = job.options.upscale
        headers = {"X-Input-Size": f"{w}x{h}", "X-Output-Size": f"{w * u}x{h * u}",
                   "X-Mode": job.options.mode, "X-Steps": str(job.options.steps),
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
            self._check_key(request)
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
            self._check_key(request)
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

    @fastapi_app.get("/options")
    async def options(self) -> Response:
        """The choices the upload page offers (no key needed: like the page, it holds no data): the modes this
        model runs, its default steps and the server's limits."""
        return JSONResponse(page_options(self.upscaler, self.defaults, self.cfg.serve))

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
    d["serve"]["api_key"] = ""  # replicas get key digests only
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
        max_queued_requests=s.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s),
        ray_actor_options={"num_cpus": s.replica_cpus, "num_gpus": s.replica_gpus},
    )
    return deployment.bind(_absolute_paths(cfg), access_digests(cfg))


def http_options(cfg) -> dict[str, Any]:
    """Serve's HTTP options: the proxy's request timeout a little past the replica's own 504 (the replica answers
    first, with a request id; the proxy's 408 also covers time spent queued)."""
    s = cfg.serve
    return {"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s + s.body_timeout_s}


def config_from_env():
    from jobkit.config import load_config

    overrides = [x for x in os.environ.get("VOSR_SET", "").split(";") if x.strip()]
    return load_config(os.environ.get("VOSR_CONFIG") or None, overrides)


def start(cfg, blocking: bool = False) -> str:
    """Start Serve on serve.host:serve.port and deploy the app; returns its base URL. The app is built (and a
    public bind without a key refused) before anything listens."""
    app = build_app(cfg)
    serve.start(http_options=http_options(cfg))
    serve.run(app, name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix, blocking=blocking)
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


def main(argv: list[str] | None = None) -> int:
    from jobkit.args import job_parser, parse_job_args
    from jobkit.ray_env import init_ray

    p = job_parser(__doc__)
    p.add_argument("--smoke", metavar="OUT_PNG", default=None,
                   help="start, upscale one image (--image), save the answer here, stop")
    p.add_argument("--image", default=None,
                   help="LR image for --smoke (default: a 64 px bicubic x1/4 of a shipped photo's centre crop)")
    cfg, args = parse_job_args(__doc__, argv, parser=p)
    started = init_ray(cfg)
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
        from vosr.config import redact_text

        print(f"inference.serve: could not build the app from VOSR_CONFIG: {redact_text(str(exc))}", file=sys.stderr)
        return None


app = _app_from_env()


if __name__ == "__main__":
    # run the importable module's main, so replicas unpickle its classes by name
    from inference.serve import main as _main

    raise SystemExit(_main())


# --- vosr plan -----------------------------------------------------------------------------------------------------

def plan_stages(cfg, images: int) -> list:
    """`vosr plan` entries of the endpoint (jobkit/plan.py): one replica's host memory, whatever the corpus: the
    model and encoders' weights (fp32 while loading), the request bodies it may hold (max_ongoing_requests x
    max_body_bytes) and one batch of the largest images at work (decoded input and x4 float32 output, twice)."""
    from jobkit.plan import Proc, Stage, gib
    from pipelines.feature_stages import ENCODER_WEIGHT_BYTES
    from vosr.model import count_parameters

    sc = cfg.serve
    weights = 4 * count_parameters(cfg)["student_params"] + ENCODER_WEIGHT_BYTES.get(cfg.autoencoder.name, 0) \
        + ENCODER_WEIGHT_BYTES.get(cfg.semantic.name, 0)
    bodies = sc.max_ongoing_requests * sc.max_body_bytes
    work = sc.max_batch_size * 2 * (12 * sc.max_pixels + 16 * sc.max_pixels * 3 * 4)
    peak = weights + bodies + work + (1 << 30)
    return [Stage("serve", [Proc("replica", peak, f"weights {gib(weights)} + {sc.max_ongoing_requests} bodies x "
                                                  f"{gib(sc.max_body_bytes)} + batch {sc.max_batch_size} x 2 x "
                                                  f"(input + x4 output) at max_pixels {sc.max_pixels:,} + 1 GiB",
                                 "gpu" if sc.replica_gpus else "cpu", gpus=float(sc.replica_gpus))],
                  note="per replica; independent of the corpus")]
