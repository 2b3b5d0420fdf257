"""Connect to Ray the same way in every job: join a cluster (`ray job submit`, RAY_ADDRESS or run.ray.address),
or start a new local instance with the configured CPU and object-store caps."""

from __future__ import annotations

import os
from typing import Any

QUIET_HOOK = "jobkit.ray_env.quiet_dashboardless_warnings"
# "1" in the environment of the jobs a process launches onto the dashboard-less local Ray it started (the demo's
# stages): a job joining that Ray gives its own workers the quiet hook too. A job's runtime_env is its own, so the
# hook of the Ray's starter does not reach the workers of the jobs that join it.
DASHBOARDLESS_ENV = "VOSR_RAY_DASHBOARDLESS"


def local_runtime_env(env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """runtime_env of a job on a dashboard-less local Ray: the quiet hook, plus `env_vars`."""
    env: dict[str, Any] = {"worker_process_setup_hook": QUIET_HOOK}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def start_local_ray(env_vars: dict[str, str] | None = None, **kwargs: Any) -> None:
    """A new dashboard-less local Ray (address="local") whose workers run the quiet hook; jobs joining it get
    the hook when launched with DASHBOARDLESS_ENV=1. kwargs go to ray.init (num_cpus, object_store_memory, ...)."""
    import ray

    ray.init(address="local", include_dashboard=False, runtime_env=local_runtime_env(env_vars), **kwargs)


def init_ray(cfg: Any) -> bool:
    """Join a cluster (run.ray.address, or RAY_ADDRESS as `ray job submit` sets it) or start a new local Ray with
    the run.ray caps. True when this call started a local instance (its caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.run.ray.address or os.environ.get("RAY_ADDRESS", "")
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address:
        if os.environ.get(DASHBOARDLESS_ENV) == "1":  # joining the project's own local Ray (the demo's)
            kwargs["runtime_env"] = local_runtime_env()
        ray.init(address=address, **kwargs)
        return False
    if cfg.run.ray.num_cpus:
        kwargs["num_cpus"] = cfg.run.ray.num_cpus
    if cfg.run.ray.object_store_memory_mb:
        kwargs["object_store_memory"] = cfg.run.ray.object_store_memory_mb * 2**20
    # "local" always starts a fresh instance with these caps; to join a running cluster from a plain run, set
    # run.ray.address (e.g. "auto") or RAY_ADDRESS. `ray job submit` sets RAY_ADDRESS by itself.
    start_local_ray(**kwargs)
    return True


def quiet_dashboardless_warnings() -> None:
    """Worker set-up hook of a local, dashboard-less Ray. Ray Train 2.60's placement-group cleaner asks the State
    API (served by the dashboard) every second whether the train controller is alive and logs a warning each time
    it cannot: about one identical line per second of training (354 in one demo), burying the job's progress.
    Without a dashboard the cleaner can do nothing anyway; the placement group ends with this local Ray. (It is a
    detached actor that never learns the controller ended, so on a Ray shared by several jobs, the demo's, it
    keeps warning during the later jobs too: 740 lines of one pretraining printed during distillation.)"""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def memory_reservation(nbytes: int) -> int:
    """A task's or actor's stated peak as its Ray `memory` request, capped at the largest live node's memory
    resource (a request no node can grant would leave the work pending forever; `vosr plan` is where a bound
    over the nodes is reported). 0 (no request) when Ray is not running."""
    import ray

    if not ray.is_initialized():
        return 0
    nodes = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    cap = max(nodes) if nodes else 0
    return int(min(int(nbytes), cap)) if cap else int(nbytes)
