"""MLflow for the jobs: absolute tracking and artifact locations (Ray workers run elsewhere), and the one run a
driver-side job logs (log_job_run)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def resolve_tracking_uri(cfg: Any) -> str:
    """run.mlflow.tracking_uri when set; else MLflow's own MLFLOW_TRACKING_URI when set; else the local default,
    sqlite:///<run.output_root>/mlflow.db (absolute; the folder is created only in this last case)."""
    uri = cfg.run.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    root = Path(cfg.run.output_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def resolve_registry_uri(cfg: Any) -> str:
    """run.mlflow.registry_uri when set; else MLFLOW_REGISTRY_URI when set; else the tracking URI (MLflow's rule)."""
    return (cfg.run.mlflow.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI", "")
            or resolve_tracking_uri(cfg))


def _is_server(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https", "databricks", "databricks-uc")


def resolve_artifact_location(cfg: Any) -> str:
    """Artifact root of a new experiment: run.mlflow.artifact_location; else the tracking server's own choice ("")
    when the tracking URI is a server; else <run.output_root>/mlartifacts (absolute)."""
    loc = cfg.run.mlflow.artifact_location
    if loc:
        return loc if "://" in loc else Path(loc).resolve().as_uri()
    if _is_server(resolve_tracking_uri(cfg)):
        return ""
    return (Path(cfg.run.output_root).resolve() / "mlartifacts").as_uri()


_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def point_mlflow(tracking_uri: str, registry_uri: str = "") -> None:
    """mlflow.set_tracking_uri / set_registry_uri for this process, leaving the user's MLFLOW_TRACKING_URI and
    MLFLOW_REGISTRY_URI as they were. MLflow writes the URI it is given into os.environ (for subprocesses); since the
    jobs read those variables as the user's setting, a second job in the same process (a notebook, the Python API,
    the test suite) would otherwise log into the first job's store instead of its own."""
    import mlflow

    saved = {name: os.environ.get(name) for name in _URI_VARIABLES}
    registry = registry_uri or saved["MLFLOW_REGISTRY_URI"] or ""
    try:
        mlflow.set_tracking_uri(tracking_uri)
        # a registry equal to the tracking URI is MLflow's own default: "" lets it follow the tracking URI, and
        # clears a registry an earlier job of this process set (MLflow clients without an explicit registry
        # would otherwise keep registering there)
        mlflow.set_registry_uri(registry if registry and registry != tracking_uri else "")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def setup_mlflow(cfg: Any) -> str:
    """Point MLflow at the configured store and return the experiment id (created with an absolute artifact root)."""
    import mlflow

    point_mlflow(resolve_tracking_uri(cfg), resolve_registry_uri(cfg))
    name = cfg.run.mlflow.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        exp_id = mlflow.create_experiment(name, artifact_location=resolve_artifact_location(cfg) or None)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def log_params(params: dict[str, Any]) -> None:
    """mlflow.log_params of the active run, secrets redacted (vosr.config.redact)."""
    import mlflow

    from vosr.config import redact

    mlflow.log_params(redact(params))


def log_dict(data: dict[str, Any], artifact_file: str) -> None:
    """mlflow.log_dict of the active run, secrets redacted (vosr.config.redact)."""
    import mlflow

    from vosr.config import redact

    mlflow.log_dict(redact(data), artifact_file)


def numeric_leaves(data: dict[str, Any], prefix: str = "") -> dict[str, int | float]:
    """The numbers of a nested dict, flat ("stage1.fetched" -> 12); booleans and text are left out, and "/"
    becomes "_" (MLflow metric names)."""
    out: dict[str, int | float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}".replace("/", "_")
        if isinstance(value, dict):
            out.update(numeric_leaves(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def log_job_run(cfg: Any, job: str, params: dict[str, Any], summary: dict[str, Any],
                metrics: dict[str, float] | None = None, artifacts: list[tuple[Path, str | None]] = (),
                tags: dict[str, str] | None = None) -> str:
    """The one MLflow run of a driver-side job (curate, precompute, evaluate; the demo's record of its serve smoke
    test): named <run.name>-<job> and tagged vosr.job=<job> (as training's runs are), with its parameters, its
    metrics (by default every number of `summary`), `summary` itself as <job>_summary.json, and `artifacts` as
    (local file, artifact folder) pairs. Returns the run id. (Training logs from its workers, training/tracking.py,
    into a run it resumes.)"""
    import mlflow

    setup_mlflow(cfg)
    with mlflow.start_run(run_name=f"{cfg.run.name}-{job}", tags={"vosr.job": job, **(tags or {})}) as active:
        log_params(params)
        mlflow.log_metrics({k: float(v) for k, v in (numeric_leaves(summary) if metrics is None else metrics).items()})
        log_dict(summary, f"{job}_summary.json")
        for path, folder in artifacts:
            if path.is_file():
                mlflow.log_artifact(str(path), artifact_path=folder)
        return active.info.run_id
