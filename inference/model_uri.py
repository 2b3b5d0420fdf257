"""Resolve where a model lives to a local checkpoint folder (config.json + model.safetensors).

Accepted: an s3:// checkpoint folder (copied to a local folder first), a local folder (the checkpoint itself, or any folder with exactly one checkpoint somewhere inside, as
an MLflow model's artifacts are), or an MLflow URI (`models:/name/version`, `models:/name@alias`,
`runs:/run_id/path`), downloaded with mlflow.artifacts.download_artifacts from the configured tracking server.
MLflow stays out of vosr/: this is the only place that imports it for inference.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
CHECKPOINT_FILES = ("config.json", "model.safetensors")


class ModelNotFoundError(FileNotFoundError):
    """No checkpoint folder could be found where the model URI points."""


def is_checkpoint(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def find_checkpoint(root: str | Path) -> Path:
    """The folder under `root` (or `root` itself) holding config.json + model.safetensors; exactly one."""
    root = Path(root)
    if not root.exists():
        raise ModelNotFoundError(f"model path {root} does not exist")
    if is_checkpoint(root):
        return root
    found = sorted({p.parent for p in root.rglob("model.safetensors") if is_checkpoint(p.parent)})
    if not found:
        raise ModelNotFoundError(f"no checkpoint folder (config.json + model.safetensors) under {root}")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found[:5])
        raise ModelNotFoundError(f"{len(found)} checkpoint folders under {root} ({names}); point at one of them")
    return found[0]


def tracking_uri_for(cfg) -> str:
    """The configured MLflow tracking URI, resolved like every job does (vosr.tracking: run.mlflow.tracking_uri,
    else sqlite under run.output_root); without a config, MLFLOW_TRACKING_URI or MLflow's default."""
    if cfg is None:
        return os.environ.get("MLFLOW_TRACKING_URI", "")
    from vosr.tracking import resolve_tracking_uri

    return resolve_tracking_uri(cfg)


def resolve_model(uri: str, cfg=None, download_root: str | Path | None = None) -> Path:
    """A local checkpoint folder for `uri` (a path or an MLflow URI)."""
    if not uri:
        raise ModelNotFoundError("no model given: set inference.checkpoint to a checkpoint folder or models:/name/"
                                 "version")
    if uri.startswith(MLFLOW_SCHEMES):
        import mlflow

        tracking = tracking_uri_for(cfg)
        if tracking:
            mlflow.set_tracking_uri(tracking)
        dst = Path(download_root) if download_root else Path(tempfile.mkdtemp(prefix="vosr-model-"))
        dst.mkdir(parents=True, exist_ok=True)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
        except Exception as exc:  # noqa: BLE001 - MLflow raises several types; say which model failed
            raise ModelNotFoundError(f"could not download {uri} from {tracking or 'the default tracking URI'}: "
                                     f"{exc}") from exc
        return find_checkpoint(local)
    if uri.startswith("s3://"):
        return find_checkpoint(_download_s3_folder(uri, cfg, download_root))
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return find_checkpoint(Path(uri).expanduser())


def _download_s3_folder(uri: str, cfg, download_root: str | Path | None) -> Path:
    """Copy a checkpoint folder on s3:// (as Ray Train writes it) to a local folder."""
    from vosr.storage import fsspec_fs

    endpoint = getattr(getattr(cfg, "train", None), "s3_endpoint_url", "") if cfg is not None else ""
    fs = fsspec_fs(uri, endpoint)
    dst = Path(download_root) if download_root else Path(tempfile.mkdtemp(prefix="vosr-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    src = uri[len("s3://"):].rstrip("/")
    files = [f for f in fs.find(src) if not f.rsplit("/", 1)[-1].startswith(".")]
    if not files:
        raise ModelNotFoundError(f"nothing found at {uri}")
    for f in files:
        local = dst / os.path.relpath(f, src)
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get(f, str(local))
    return dst
