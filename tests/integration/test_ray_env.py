"""jobkit/ray_env.init_ray: a plain (non-cluster) run starts a local Ray with the configured caps; the workers of
a training job quiet the warning Ray Train's placement-group cleaner logs every second when there is no dashboard,
also when the job joins such a Ray (the demo's stages, RAY_ADDRESS + VOSR_RAY_DASHBOARDLESS=1); any other job
runs without a runtime_env (its workers start without Ray's extra set-up interpreter)."""

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
for flag, ray_train in (("1", True), ("1", False), ("", True)):
    os.environ[DASHBOARDLESS_ENV] = flag
    assert init_ray(config_from_dict({}), ray_train=ray_train) is False  # joined RAY_ADDRESS: started nothing

    @ray.remote(num_cpus=0)
    def level(name):
        return logging.getLogger(name).getEffectiveLevel()

    levels[f"{flag or 'unset'} train={ray_train}"] = [ray.get(level.remote(sys.argv[1])),
                                                      ray.get_runtime_context().get_runtime_env_string()]
    ray.shutdown()
print(json.dumps(levels))
"""


def test_a_training_job_joining_a_dashboardless_local_ray_quiets_its_own_workers(ray_local):
    """The session's Ray is such a local Ray. A job's runtime_env is its own, so the starter's hook does not reach
    the workers of the jobs that join: with VOSR_RAY_DASHBOARDLESS=1 (what the demo gives its stages) a training
    job gives them the hook, which keeps it free of the cleaner's warnings; without it, it does not; a job that
    runs no Ray Train joins with no runtime_env at all."""
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", JOINING_JOB, CLEANER_LOGGER], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    levels = json.loads(run.stdout.strip().splitlines()[-1])
    trained, other, unset = levels["1 train=True"], levels["1 train=False"], levels["unset train=True"]
    assert trained[0] == logging.ERROR and "quiet_dashboardless_warnings" in trained[1], levels
    assert other[0] < logging.ERROR and json.loads(other[1]) == {}, levels
    assert unset[0] < logging.ERROR and json.loads(unset[1]) == {}, levels


@pytest.mark.own_ray  # starts its own local Ray (tests/conftest.py)
def test_local_ray_has_the_caps_and_a_training_job_quiet_workers(monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = config_from_dict({"run": {"ray": {"num_cpus": 1, "object_store_memory_mb": 128}}})
    init_ray(cfg, ray_train=True)
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
