"""jobkit/ray_env.init_ray: a plain (non-cluster) run starts a local Ray with the configured caps, and its
workers quiet the warning Ray Train's placement-group cleaner logs every second when there is no dashboard; a job
that joins such a Ray (the demo's stages, RAY_ADDRESS + VOSR_RAY_DASHBOARDLESS=1) quiets its own workers too."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobkit.config import config_from_dict
from jobkit.ray_env import init_ray

ROOT = Path(__file__).resolve().parents[2]
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
JOINING_JOB = """
import json, logging, os, sys
import ray
from jobkit.config import config_from_dict
from jobkit.ray_env import DASHBOARDLESS_ENV, init_ray

levels = {}
for flag in ("1", ""):
    os.environ[DASHBOARDLESS_ENV] = flag
    assert init_ray(config_from_dict({})) is False  # joined RAY_ADDRESS: started nothing

    @ray.remote(num_cpus=0)
    def level(name):
        return logging.getLogger(name).getEffectiveLevel()

    levels[flag or "unset"] = ray.get(level.remote(sys.argv[1]))
    ray.shutdown()
print(json.dumps(levels))
"""


def test_a_job_joining_a_dashboardless_local_ray_quiets_its_own_workers(ray_local):
    """The session's Ray is such a local Ray. A job's runtime_env is its own, so the starter's hook does not reach
    the workers of the jobs that join: with VOSR_RAY_DASHBOARDLESS=1 (what the demo gives its stages) they get it,
    which keeps a training job among them free of the cleaner's warnings; without it they do not."""
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", JOINING_JOB, CLEANER_LOGGER], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    levels = json.loads(run.stdout.strip().splitlines()[-1])
    assert levels["1"] == logging.ERROR and levels["unset"] < logging.ERROR, levels


@pytest.mark.own_ray  # starts its own local Ray (tests/conftest.py)
def test_local_ray_has_the_caps_and_quiet_workers(monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = config_from_dict({"run": {"ray": {"num_cpus": 1, "object_store_memory_mb": 128}}})
    init_ray(cfg)
    try:
        assert ray.cluster_resources()["CPU"] == 1
        assert ray.cluster_resources()["object_store_memory"] <= 128 * 2**20

        @ray.remote(num_cpus=1)
        def cleaner_level() -> int:
            return logging.getLogger(CLEANER_LOGGER).getEffectiveLevel()

        assert ray.get(cleaner_level.remote()) == logging.ERROR
        assert logging.getLogger(CLEANER_LOGGER).getEffectiveLevel() < logging.ERROR  # the driver is untouched
    finally:
        ray.shutdown()
