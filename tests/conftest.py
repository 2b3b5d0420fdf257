"""Shared fixtures. Ray tests start a capped local instance and shut it down; never `ray stop`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV_DATA = (ROOT.parent / "shared" / "data" / "dev").resolve()
ASSET_PHOTOS = ROOT / "assets" / "photos"
sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def dev_photos() -> list[Path]:
    """Real photos for tests: ../shared/data/dev when present (CI has it), else the photos the project ships."""
    root = DEV_DATA if DEV_DATA.is_dir() else ASSET_PHOTOS
    return sorted(p for p in root.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})


_MLFLOW_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")
_MLFLOW_AT_START = {name: os.environ.get(name) for name in _MLFLOW_VARIABLES}


@pytest.fixture(autouse=True)
def mlflow_environment_restored():
    """After each test, MLflow's URI/experiment variables are back to what the session started with: a test that
    calls mlflow.set_tracking_uri / set_experiment itself (MLflow writes those into os.environ) must not point the
    next test's jobs at its store."""
    yield
    if "mlflow" in sys.modules:  # and no process-wide registry left behind: clients would register there
        sys.modules["mlflow"].set_registry_uri("")
    for name, value in _MLFLOW_AT_START.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    return dev_photos()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs and a capped object store, shut down after the module."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    from jobkit.ray_env import start_local_ray

    start_local_ray({"PYTHONPATH": str(ROOT)}, num_cpus=2, object_store_memory=300 * 2**20)  # quiet workers
    yield ray
    ray.shutdown()


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: the models in tests are tiny and the test machine's 2 cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
