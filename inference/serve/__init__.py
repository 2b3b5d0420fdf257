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
- GET  /readyz               no key: 200 {"status": "ready"} only when /upscale is routed and a model replica has
                             loaded the model, else 503 + Retry-After (the readiness probe of the RayService).
- GET  /healthz              JSON: model (no local paths), limits, request counters (this ingress replica: HTTP
                             statuses, model_retries), batch sizes and model_time (the answering model replica's
                             seconds in forward passes and waiting for batches to fill); 503 like /readyz.
Errors are JSON {"error": code, "message": ..., "request_id": ...} (the X-Request-Id Ray Serve answers with), never
FastAPI's {"detail": [...]}: a refused option is {"error": "bad_option", "message": "steps='0': Input should be
greater than or equal to 1", ...}, one "name=value: reason" per refused option, joined by "; ".
401 missing/wrong X-API-Key (every route except the static page, its script, /options and /readyz, which hold no
data), 408 a body not read within serve.body_timeout_s (or the proxy's request timeout), 413 a body over
serve.max_body_bytes (counted while streaming, raw and multipart alike), too many pixels or a request over
serve.max_evaluations, 415 not an image, 400 a corrupt image, 422 bad options or options costing more than
serve.max_cost_ratio x the defaults on the same image, 503 + Retry-After when the queue is full or no model
replica could take the request before its deadline (a replica that dies is replaced; the ingress resends the
requests it held), 504 past serve.request_timeout_s, 500 a failure inside the model: a generic message with the
request id; the model replica logs the traceback with that id. A server fault such as a dead replica is never a 500.

The package, one concern per module:
- errors.py      the error format (ServeError), request ids
- auth.py        API keys: loading, digests, the constant-time check
- limits.py      query options, their bounds, image caps, the cost model and the page's choices
- body.py        the streaming body reader (raw and multipart), capped while it arrives
- deployment.py  the Serve deployments: the HTTP ingress (routes, retries) and the model (batching)
- application.py application construction (build_app, http_options, start) and `app` for `serve run`
- cli.py         the job's command line (`python -m inference.serve`, `vosr serve`)

Run: `serve run inference.serve:app` (config from the VOSR_CONFIG env var, else the defaults; overrides from
VOSR_SET="a.b=1;c.d=2"), or `python -m inference.serve --config configs/serve/tiny.yaml` (blocks until Ctrl-C;
`--smoke OUT.png` starts, sends one request, saves the answer and stops).
"""

from inference.serve.application import (
    INGRESS_DEPLOYMENT,
    MODEL_DEPLOYMENT,
    build_app,
    config_from_env,
    http_options,
    start,
)
from inference.serve.auth import access_digests, is_loopback, key_digest, load_api_keys
from inference.serve.body import read_body
from inference.serve.cli import main, smoke
from inference.serve.errors import ServeError, ServeStartError
from inference.serve.limits import check_cost, decode_upload, parse_query

__all__ = ["INGRESS_DEPLOYMENT", "MODEL_DEPLOYMENT", "ServeError", "ServeStartError", "access_digests", "app",
           "build_app", "check_cost", "config_from_env", "decode_upload", "http_options", "is_loopback",
           "key_digest", "load_api_keys", "main", "parse_query", "read_body", "smoke", "start"]


def __getattr__(name: str):
    """`inference.serve:app` (the import path of `serve run` and the RayService manifest): built from VOSR_CONFIG /
    VOSR_SET when asked for, so that importing the package (the replicas do) builds nothing."""
    if name == "app":
        from inference.serve.application import app_from_env

        return app_from_env()
    raise AttributeError(f"module 'inference.serve' has no attribute {name!r}")
