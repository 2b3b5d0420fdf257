"""Run-level configuration: naming, seeds, Ray and MLflow."""

from __future__ import annotations

from dataclasses import dataclass

from .schema import option


@dataclass
class RayConfig:
    address: str = option("", "Ray address; empty starts (or joins, under `ray job submit`) a local instance.")
    num_cpus: int = option(0, "CPUs for a locally started Ray (0 = all).", ge=0)
    object_store_memory_mb: int = option(0, "Object store cap in MiB for a locally started Ray (0 = Ray's default).",
                                         ge=0)


@dataclass
class MlflowConfig:
    enabled: bool = option(True, "Track the run in MLflow.")
    tracking_uri: str = option("", "MLflow tracking URI; empty = sqlite:///<output_root>/mlflow.db (absolute).")
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
