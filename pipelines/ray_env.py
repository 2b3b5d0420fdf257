"""Connect to Ray the same way in every job: join a cluster (`ray job submit`, RAY_ADDRESS or run.ray.address),
or start a new local instance with the configured CPU and object-store caps."""

from __future__ import annotations

import os
from typing import Any


def init_ray(cfg: Any) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.run.ray.address or os.environ.get("RAY_ADDRESS", "")
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
        return
    if cfg.run.ray.num_cpus:
        kwargs["num_cpus"] = cfg.run.ray.num_cpus
    if cfg.run.ray.object_store_memory_mb:
        kwargs["object_store_memory"] = cfg.run.ray.object_store_memory_mb * 2**20
    # "local" always starts a fresh instance with these caps; to join a running cluster from a plain run, set
    # run.ray.address (e.g. "auto") or RAY_ADDRESS. `ray job submit` sets RAY_ADDRESS by itself.
    ray.init(address="local", include_dashboard=False,
             runtime_env={"worker_process_setup_hook": "pipelines.ray_env.quiet_dashboardless_warnings"}, **kwargs)


def quiet_dashboardless_warnings() -> None:
    """Worker set-up hook of a local, dashboard-less Ray. Ray Train 2.60's placement-group cleaner asks the State
    API (served by the dashboard) every second whether the train controller is alive and logs a warning each time
    it cannot: about one identical line per second of training (354 in one demo), burying the job's progress.
    Without a dashboard the cleaner can do nothing anyway; the placement group ends with this local Ray."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
