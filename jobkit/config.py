"""The one configuration every job loads: the method's sections (vosr/config: model, autoencoder, semantic, flow,
distill, degrade, data, inference), `run` (here: naming, seed, Ray and MLflow, every job has them) and the jobs' own
sections, each declared beside its job with @config_section (jobkit/jobs.py):

    curate, precompute   pipelines/config.py
    train, distill_job   training/config.py
    serve, eval          inference/config.py

`Config` is built from the job table (jobkit/jobs.py) on first use, so this module imports no job package.
`load_config(path, overrides)` reads a YAML file (with the files it extends by `base:`, vosr/config/root.py) and
`--set section.key=value` overrides into `Config`; `vosr config --explain` documents every key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobkit.jobs import job_sections
from vosr.config import PRESETS as METHOD_PRESETS
from vosr.config import ConfigError, MethodConfig, option, read_yaml, redact, save_config, to_dict
from vosr.config import config_from_dict as _method_config_from_dict
from vosr.config import explain_config as _method_explain_config

__all__ = ["PRESETS", "ConfigError", "config_from_dict", "config_root", "explain_config", "load_config",
           "redact", "save_config", "to_dict"]


@dataclass
class RayConfig:
    address: str = option("", "Ray address; empty starts (or joins, under `ray job submit`) a local instance.")
    num_cpus: int = option(0, "CPUs for a locally started Ray (0 = all).", ge=0)
    object_store_memory_mb: int = option(0, "Object store cap in MiB for a locally started Ray (0 = Ray's default).",
                                         ge=0)


@dataclass
class MlflowConfig:
    enabled: bool = option(True, "Track the run in MLflow.")
    tracking_uri: str = option("", "MLflow tracking URI; empty = MLflow's MLFLOW_TRACKING_URI environment variable "
                               "when set, else sqlite:///<output_root>/mlflow.db (absolute).")
    registry_uri: str = option("", "MLflow model registry URI; empty = MLFLOW_REGISTRY_URI when set, else the "
                               "tracking URI.")
    experiment: str = option("vosr", "MLflow experiment name.")
    artifact_location: str = option("", "Artifact root for a new experiment; empty = <output_root>/mlartifacts "
                                    "(absolute, so Ray workers in other folders agree).")


@dataclass
class RunConfig:
    name: str = option("vosr", "Run name (MLflow run name and output sub-folder).")
    seed: int = option(0, "Global seed; per-sample streams derive from (seed, sample id, variant).")
    output_root: str = option("outputs", "Root of local outputs (MLflow store, reports) when paths are relative.")
    ray: RayConfig = option(RayConfig(), "Ray connection.")
    mlflow: MlflowConfig = option(MlflowConfig(), "Experiment tracking.")
    head_memory_gb: float = option(0.0, "Memory of the driver's node in GiB, for `vosr plan` (0 = from the job's "
                                   "KubeRay manifest in infra/k8s).", ge=0)
    worker_memory_gb: float = option(0.0, "Memory of one CPU worker node in GiB, for `vosr plan` (0 = from the "
                                     "manifest).", ge=0)
    gpu_worker_memory_gb: float = option(0.0, "Memory of one GPU worker node in GiB, for `vosr plan` (0 = from the "
                                         "manifest).", ge=0)


# What a preset sets in the jobs' sections, on top of the method's preset.
JOB_PRESETS: dict[str, dict[str, Any]] = {
    "vosr-0.5b": {"eval": {"crop": 512}},   # paper s4 protocol: 512 x 512 centre-cropped GT, 128 x 128 LR
    "vosr-1.4b": {"eval": {"crop": 512}},
}
PRESETS: dict[str, dict[str, Any]] = {name: {**copy.deepcopy(sections), **copy.deepcopy(JOB_PRESETS.get(name, {}))}
                                      for name, sections in METHOD_PRESETS.items()}


@functools.cache
def config_root() -> type:
    """The root dataclass `Config`: the method's sections, `run`, then every job's registered sections in the job
    table's order."""
    fields = [("run", RunConfig, option(RunConfig(), "Run naming, seed, Ray and MLflow."))]
    fields += [(s.name, s.cls, option(s.cls(), s.doc)) for s in job_sections()]
    root = dataclasses.make_dataclass("Config", fields, bases=(MethodConfig,))
    root.__module__ = __name__  # pickled by reference as jobkit.config.Config (module __getattr__ below)
    root.__doc__ = "Every section of a job's configuration (jobkit/config.py)."
    return root


def __getattr__(name: str) -> Any:
    if name == "Config":
        return config_root()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config_from_dict(data: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Preset, then `data`, then `section.key=value` overrides; validated against the whole schema."""
    return _method_config_from_dict(data, overrides, root=config_root(), presets=PRESETS)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load a YAML config file (or only the preset defaults when `path` is None) plus overrides."""
    return config_from_dict(read_yaml(path), overrides)


def explain_config(section: str | None = None) -> str:
    """Documentation of every key of every section with its default (tiny preset defaults shown)."""
    return _method_explain_config(section, root=config_root(), presets=PRESETS)
