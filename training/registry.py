"""Register a student checkpoint folder in the MLflow model registry.

The registered model is an MLflow pyfunc model whose artifacts hold the checkpoint folder, so
`mlflow.artifacts.download_artifacts("models:/<name>/<version>")` yields a directory that contains the folder with
config.json + model.safetensors (+ ema_model.safetensors); inference/model_uri.py finds it there. Its predict()
runs the one-step upscaler on float arrays; serving uses Upscaler directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    import mlflow.pyfunc as _pyfunc

    _Base = _pyfunc.PythonModel
except Exception:  # pragma: no cover - mlflow is a hard dependency of the training jobs
    _Base = object

ARTIFACT_KEY = "checkpoint"
TRAINING_ONLY = ("train_state.json", "train_state.safetensors")


class StudentCheckpointModel(_Base):
    """pyfunc wrapper: loads the checkpoint with vosr.checkpoint; predict() maps LR images to SR images."""

    def load_context(self, context):
        from vosr.checkpoint import load_checkpoint

        self.folder = context.artifacts[ARTIFACT_KEY]
        self.model, self.cfg, self.meta = load_checkpoint(self.folder, use_ema=True)

    def predict(self, context, model_input, params=None):  # pragma: no cover - serving uses vosr.upscaler
        from vosr.upscaler import Upscaler

        up = Upscaler(self.folder, self.cfg)
        return [up(img) for img in model_input]


def _inference_copy(folder: str, dst: Path) -> Path:
    """The checkpoint without optimiser/RNG state (training-only, several times the weights' size)."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(folder).iterdir():
        if f.is_file() and f.name not in TRAINING_ONLY:
            shutil.copy2(f, dst / f.name)
    _redact_config(dst / "config.json")
    return dst


def _redact_config(path: Path) -> None:
    """Registry metadata without credentials, also for checkpoints written before config.json was redacted."""
    import json

    from vosr.config import redact

    meta = json.loads(path.read_text())
    clean = redact(meta)
    if clean != meta:
        path.write_text(json.dumps(clean, indent=2, sort_keys=True))


def register_student(folder: str, name: str, tracking_uri: str, run_id: str = "") -> int:
    """Log the checkpoint as a pyfunc model (inside `run_id` when given) and register it; returns the version."""
    import tempfile

    import mlflow

    if not (Path(folder) / "config.json").is_file() or not (Path(folder) / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (config.json + model.safetensors)")
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="vosr-register-") as tmp:
        ckpt = _inference_copy(folder, Path(tmp) / "checkpoint")
        kwargs: dict[str, Any] = {"python_model": StudentCheckpointModel(), "artifacts": {ARTIFACT_KEY: str(ckpt)},
                                  "registered_model_name": name, "pip_requirements": ["torch", "safetensors"]}
        if run_id:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(name="student", **kwargs)
        else:
            info = mlflow.pyfunc.log_model(name="student", **kwargs)
    version = info.registered_model_version
    if version is None:
        raise RuntimeError(f"MLflow did not register model {name!r}")
    return int(version)
