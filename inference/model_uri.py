"""Resolve a model URI with the settings of a job's config: the jobs' front of vosr/model_uri.py.

vosr/model_uri.py holds the resolvers (local folder, s3://, MLflow models:/ runs:/ mlflow-artifacts:/, hf://, one per scheme,
each importing its client lazily) and the cache; this module only takes from the config what they need:
- the S3 endpoint: the first non-empty `*.s3_endpoint_url` of the config;
- the MLflow tracking URI: run.mlflow.tracking_uri when set, else MLFLOW_TRACKING_URI when set, else the jobs'
  default sqlite store under run.output_root (jobkit.tracking.resolve_tracking_uri); the registry URI:
  run.mlflow.registry_uri, else MLFLOW_REGISTRY_URI, else the tracking URI;
- the cache root: `download_root` when given, else $VOSR_MODEL_CACHE, else ~/.cache/vosr/models.
"""

from __future__ import annotations

from pathlib import Path

from vosr.model_uri import (  # noqa: F401 - re-exported: the names the jobs and tests import from here
    CHECKPOINT_FILES,
    MLFLOW_SCHEMES,
    ModelNotFoundError,
    default_cache_root,
    fetch_remote_checkpoint,
    find_checkpoint,
    is_checkpoint,
    resolve,
    scheme_of,
)


def tracking_uri_for(cfg) -> str:
    """The MLflow tracking URI a job uses (see the module docstring); without a config, MLFLOW_TRACKING_URI or ""
    (MLflow's default)."""
    import os

    if cfg is None:
        return os.environ.get("MLFLOW_TRACKING_URI", "")
    from jobkit.tracking import resolve_tracking_uri

    return resolve_tracking_uri(cfg)


def registry_uri_for(cfg) -> str:
    from jobkit.tracking import resolve_registry_uri

    return resolve_registry_uri(cfg) if cfg is not None else ""


def endpoint_url_for(cfg) -> str:
    """The S3 endpoint override of the config (the first non-empty `*.s3_endpoint_url`); empty = vosr.storage's
    AWS_ENDPOINT_URL / AWS default."""
    for section in ("inference", "eval", "train", "precompute", "curate"):
        value = getattr(getattr(cfg, section, None), "s3_endpoint_url", "") if cfg is not None else ""
        if value:
            return value
    return ""


def resolve_model(uri: str, cfg=None, download_root: str | Path | None = None) -> Path:
    """A local checkpoint folder for `uri` (a path, an s3:// folder or an MLflow URI), with the config's S3
    endpoint and MLflow URIs. The MLflow URIs are only worked out (and a default sqlite store only created) for
    an MLflow URI."""
    tracking = registry = ""
    if uri and scheme_of(uri) in MLFLOW_SCHEMES:
        tracking, registry = tracking_uri_for(cfg), registry_uri_for(cfg)
    return resolve(uri, endpoint_url=endpoint_url_for(cfg), tracking_uri=tracking, registry_uri=registry,
                   cache_root=download_root)
