"""MLflow set-up shared by every job: absolute tracking and artifact locations (Ray workers run elsewhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def resolve_tracking_uri(cfg: Any) -> str:
    uri = cfg.run.mlflow.tracking_uri
    if uri:
        return uri
    root = Path(cfg.run.output_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def resolve_artifact_location(cfg: Any) -> str:
    loc = cfg.run.mlflow.artifact_location
    if loc:
        return loc if "://" in loc else Path(loc).resolve().as_uri()
    return (Path(cfg.run.output_root).resolve() / "mlartifacts").as_uri()


def setup_mlflow(cfg: Any) -> str:
    """Point MLflow at the configured store and return the experiment id (created with an absolute artifact root)."""
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(cfg))
    name = cfg.run.mlflow.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        exp_id = mlflow.create_experiment(name, artifact_location=resolve_artifact_location(cfg))
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
