"""Register a student checkpoint folder in the MLflow model registry as a pyfunc model that serves.

The logged model is inference/pyfunc_model.py ("models from code") with
- artifacts: the checkpoint folder (config.json + model.safetensors + ema_model.safetensors; no optimiser state), so
  `models:/<name>/<version>` also resolves to a checkpoint folder for the CLI, Serve and Upscaler.from_pretrained;
- code_paths: the vosr package, so the model loads where this repository is not installed;
- pip requirements pinned to the versions installed here (diffusers only for a VAE-based preset);
- a signature (one string column in: a DataFrame column `image` or a list of strings; `image`, `width`,
  `height` out; parameters seed, steps, guidance, tile, color_fix) and an input example (one small base64 PNG), so `mlflow models serve` validates requests.
The registered version is tagged (vosr.preset, vosr.steps, vosr.inference_steps, vosr.training_run,
vosr.data_version, ...) and, when asked, gets an alias (distill_job.register_alias, "champion" by default).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL_CODE = ROOT / "inference" / "pyfunc_model.py"
ARTIFACT_KEY = "checkpoint"
TRAINING_ONLY = ("train_state.json", "train_state.safetensors")
BASE_REQUIREMENTS = ("torch", "numpy", "pillow", "safetensors", "timm", "pyyaml", "pyarrow", "fsspec", "pandas")


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
    from vosr.config import redact

    meta = json.loads(path.read_text())
    clean = redact(meta)
    if clean != meta:
        path.write_text(json.dumps(clean, indent=2, sort_keys=True))


def requirements(checkpoint_config: dict) -> list[str]:
    """pip requirements of the pyfunc model, pinned to what is installed here."""
    from importlib.metadata import PackageNotFoundError, version

    names = list(BASE_REQUIREMENTS)
    if (checkpoint_config.get("autoencoder") or {}).get("name", "pixel") != "pixel":
        names.append("diffusers")
    out = []
    for name in names:
        try:
            v = version(name)
        except PackageNotFoundError:
            out.append(name)
            continue
        out.append(f"{name}=={v.split('+')[0]}")
    return out


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema([
        ParamSpec("seed", "long", 42), ParamSpec("steps", "long", 0), ParamSpec("guidance", "double", 0.5),
        ParamSpec("tile", "long", 0), ParamSpec("color_fix", "string", "adain")])
    # one unnamed string column: accepts a DataFrame with an `image` column and a plain list of strings alike
    return ModelSignature(inputs=Schema([ColSpec("string")]),
                          outputs=Schema([ColSpec("string", "image"), ColSpec("long", "width"),
                                          ColSpec("long", "height")]),
                          params=params)


def input_example():
    """One 12 x 8 crop of a shipped photo as base64 PNG, and the default parameters."""
    import pandas as pd
    from PIL import Image

    photos = sorted(p for p in (ROOT / "assets" / "photos").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    with Image.open(photos[0]) as im:
        small = im.convert("RGB").resize((12, 8), Image.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]}), {"seed": 42}


def register_student(folder: str, name: str, tracking_uri: str, run_id: str = "", *, registry_uri: str = "",
                     tags: dict[str, Any] | None = None, alias: str = "") -> int:
    """Log the checkpoint as a pyfunc model (inside `run_id` when given), register it under `name`, tag the
    version and point `alias` at it; returns the version."""
    import tempfile

    import mlflow
    from mlflow import MlflowClient

    import vosr
    from jobkit.tracking import point_mlflow

    if not (Path(folder) / "config.json").is_file() or not (Path(folder) / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (config.json + model.safetensors)")
    point_mlflow(tracking_uri, registry_uri)
    ckpt_config = json.loads((Path(folder) / "config.json").read_text())
    with tempfile.TemporaryDirectory(prefix="vosr-register-") as tmp:
        ckpt = _inference_copy(folder, Path(tmp) / "checkpoint")
        kwargs: dict[str, Any] = {
            "python_model": str(MODEL_CODE), "artifacts": {ARTIFACT_KEY: str(ckpt)},
            "code_paths": [str(Path(vosr.__file__).parent)], "registered_model_name": name,
            "pip_requirements": requirements(ckpt_config.get("config", ckpt_config)),
            "signature": signature(), "input_example": input_example(),
            "model_config": {"device": "auto", "dtype": "fp32"}}
        if run_id:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(name="student", **kwargs)
        else:
            info = mlflow.pyfunc.log_model(name="student", **kwargs)
    version = info.registered_model_version
    if version is None:
        raise RuntimeError(f"MLflow did not register model {name!r}")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or None)
    for key, value in (tags or {}).items():
        if value is not None and value != "":
            client.set_model_version_tag(name, str(version), key, str(value))
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
    return int(version)


def version_tags(cfg, summary: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The registry tags of a distilled student: what it is and where it came from."""
    from vosr.config import redact_text

    data = summary.get("data") or {}
    return {"vosr.preset": cfg.preset, "vosr.steps": summary.get("steps"),
            "vosr.inference_steps": cfg.distill.onestep_steps, "vosr.method": cfg.distill.method,
            "vosr.training_run": run_id, "vosr.data": redact_text(str(cfg.train.features or "online")),
            "vosr.data_version": data.get("version", ""), "vosr.job": "distill"}
