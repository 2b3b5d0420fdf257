"""Application construction: the bound Serve application for a Config, Serve's HTTP options, and starting it on
serve.host:serve.port. The app is built (and a public bind without a key refused) before anything listens."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from inference.serve.auth import access_digests


def absolute_paths(cfg) -> dict[str, Any]:
    """The config as the replicas get it: local paths made absolute in the driver (replicas run in other working
    folders), and no raw API key (replicas get key digests only)."""
    d = cfg.to_dict()
    ckpt = d["inference"]["checkpoint"]
    if ckpt and "://" not in ckpt and not ckpt.startswith("models:/") and not ckpt.startswith("runs:/"):
        d["inference"]["checkpoint"] = str(Path(ckpt).expanduser().resolve())
    d["run"]["output_root"] = str(Path(d["run"]["output_root"]).expanduser().resolve())
    for section in ("autoencoder", "semantic"):
        if d[section].get("path"):
            d[section]["path"] = str(Path(d[section]["path"]).expanduser().resolve())
    d["serve"]["api_key"] = ""
    return d


MODEL_DEPLOYMENT = "UpscaleModel"      # the deployment that loads the model (the one to kill in fault tests)
INGRESS_DEPLOYMENT = "UpscaleService"  # the HTTP ingress


def build_app(cfg, hooks=None):
    """The bound Serve application for a Config: the HTTP ingress (serve.ingress_replicas) and the model behind it
    (autoscaled within serve.min_replicas..max_replicas). `hooks`: an inference.serve.deployment.Hooks instance the
    model replicas run (the tests inject faults through it); None = none.

    Both deployments drain on scale-down and redeploys: a stopping replica takes no new request and finishes the
    ones it holds for up to serve.request_timeout_s + serve.body_timeout_s (graceful_shutdown_timeout_s); with
    serve.max_surge_percent > 0 the old model replicas keep serving until their replacements have loaded."""
    from inference.serve.deployment import UpscaleModel, UpscaleService

    s = cfg.serve
    if s.min_replicas > s.max_replicas:
        raise ValueError(f"serve.min_replicas ({s.min_replicas}) > serve.max_replicas ({s.max_replicas})")
    per_node = {"max_replicas_per_node": s.max_replicas_per_node} if s.max_replicas_per_node else {}
    common = {"graceful_shutdown_timeout_s": s.request_timeout_s + s.body_timeout_s,
              "graceful_shutdown_wait_loop_s": 1.0, "health_check_period_s": s.health_check_period_s, **per_node}
    backpressure = BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s)
    model = UpscaleModel.options(
        name=MODEL_DEPLOYMENT,
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        max_ongoing_requests=max(s.max_ongoing_requests, s.max_batch_size),
        max_queued_requests=s.max_queued_requests,     # per caller (ingress replica): then 503 + Retry-After
        ray_actor_options={"num_cpus": s.replica_cpus, "num_gpus": s.replica_gpus},
        # the ingress (and the proxy) log every request with the same request id; a second access line per call
        # here would only cost the model replica's event loop
        logging_config={"enable_access_log": False},
        max_surge_percent=s.max_surge_percent,
        **common,
    )
    # the ingress holds each request while the model works on it or it waits in the ingress's queue for the model
    # (serve.max_queued_requests, then 503 + Retry-After): room for both, and as much again for requests still
    # sending their bodies. Its redeploys replace one replica at a time (no surge: with one replica per node a
    # surge replica would need a node of its own); the proxy sends new requests to the others meanwhile.
    ingress_ongoing = s.max_replicas * max(s.max_ongoing_requests, s.max_batch_size) + 2 * s.max_queued_requests
    ingress = UpscaleService.options(
        name=INGRESS_DEPLOYMENT,
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=ingress_ongoing,
        max_queued_requests=s.max_queued_requests,
        backpressure_config=backpressure,
        ray_actor_options={"num_cpus": s.ingress_cpus},
        **common,
    )
    return ingress.bind(absolute_paths(cfg), access_digests(cfg), model.bind(absolute_paths(cfg), hooks))


PROXY_MARGIN_S = 5.0   # the proxy's own timeout comes this long after the ingress's deadline


def http_options(cfg) -> dict[str, Any]:
    """Serve's HTTP options: the proxy's request timeout (408) a little past the ingress's deadline
    (serve.request_timeout_s + serve.body_timeout_s: 503 + Retry-After for a request still waiting for a model
    replica then), so that the ingress answers first, with a request id."""
    s = cfg.serve
    return {"host": s.host, "port": s.port,
            "request_timeout_s": s.request_timeout_s + s.body_timeout_s + PROXY_MARGIN_S}


def config_from_env():
    """The config named by VOSR_CONFIG (else the defaults) with the `;`-separated overrides of VOSR_SET."""
    from jobkit.config import load_config

    overrides = [x for x in os.environ.get("VOSR_SET", "").split(";") if x.strip()]
    return load_config(os.environ.get("VOSR_CONFIG") or None, overrides)


def app_from_env():
    """`serve run inference.serve:app`: the application built from VOSR_CONFIG / VOSR_SET. A bad config is an error
    naming its cause (credentials redacted), raised when the app is asked for, not when the package is imported."""
    try:
        return build_app(config_from_env())
    except Exception as exc:
        from vosr.config import redact_text

        raise RuntimeError(f"inference.serve:app could not be built from VOSR_CONFIG / VOSR_SET: "
                           f"{redact_text(str(exc))}") from None


def start(cfg, blocking: bool = False, hooks=None) -> str:
    """Start Serve on serve.host:serve.port and deploy the app; returns its base URL."""
    app = build_app(cfg, hooks)
    serve.start(http_options=http_options(cfg))
    serve.run(app, name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix, blocking=blocking)
    prefix = cfg.serve.route_prefix.rstrip("/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}{prefix}"
