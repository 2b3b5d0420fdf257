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


def build_app(cfg, hooks=None):
    """The bound Serve application for a Config. `hooks`: an inference.serve.deployment.Hooks instance the
    replicas run around the model (the tests inject faults through it); None = none."""
    from inference.serve.deployment import UpscaleService

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
    return deployment.bind(absolute_paths(cfg), access_digests(cfg), hooks)


def http_options(cfg) -> dict[str, Any]:
    """Serve's HTTP options: the proxy's request timeout a little past the replica's own 504 (the replica answers
    first, with a request id; the proxy's 408 also covers time spent queued)."""
    s = cfg.serve
    return {"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s + s.body_timeout_s}


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
