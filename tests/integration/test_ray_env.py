"""jobkit/ray_env.init_ray: a plain (non-cluster) run starts a local Ray with the configured caps, and its
workers quiet the warning Ray Train's placement-group cleaner logs every second when there is no dashboard."""

from __future__ import annotations

import logging

import pytest

from jobkit.config import config_from_dict
from jobkit.ray_env import init_ray

pytestmark = pytest.mark.own_ray  # starts its own local Ray (tests/conftest.py)

CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


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
