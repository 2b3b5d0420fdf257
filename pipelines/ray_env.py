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
    ray.init(address="local", include_dashboard=False, **kwargs)
