"""Connect to Ray the same way in every job: join a cluster (`ray job submit`, RAY_ADDRESS or run.ray.address),
or start a new local instance with the configured CPU and object-store caps."""

from __future__ import annotations

import os
from typing import Any

QUIET_HOOK = "jobkit.ray_env.quiet_dashboardless_warnings"
# "1" in the environment of the jobs a process launches onto the dashboard-less local Ray it started (the demo's
# stages): a training job joining that Ray gives its own workers the quiet hook too. A job's runtime_env is its own,
# so the hook of the Ray's starter does not reach the workers of the jobs that join it.
DASHBOARDLESS_ENV = "VOSR_RAY_DASHBOARDLESS"


def local_runtime_env(ray_train: bool, env_vars: dict[str, str] | None = None) -> dict[str, Any] | None:
    """runtime_env of a job on a dashboard-less local Ray: the quiet hook for a job that runs Ray Train (whose
    placement-group cleaner it silences), plus `env_vars`; None for any other job without `env_vars`. A job with a
    runtime_env has Ray start each of its workers through an extra interpreter (Ray's setup_worker.py, which imports
    Ray before handing over to the worker) and cannot use the workers Ray prestarts without one: 0.95 s against
    0.57 s per actor started, twice the CPU per worker (0.78 against 0.39 s; benchmarks/bench_worker_start.py on
    the 2-core machine). Ray Train starts its own actors with a runtime_env of its own anyway, so a training job
    pays nothing more for the hook."""
    env: dict[str, Any] = {"worker_process_setup_hook": QUIET_HOOK} if ray_train else {}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env or None


def start_local_ray(env_vars: dict[str, str] | None = None, ray_train: bool = False, **kwargs: Any) -> None:
    """A new dashboard-less local Ray (address="local"); a job that runs Ray Train (`ray_train`) gives its workers
    the quiet hook, as do the jobs that join it with DASHBOARDLESS_ENV=1 and run Ray Train. kwargs go to ray.init
    (num_cpus, object_store_memory, ...)."""
    import ray

    ray.init(address="local", include_dashboard=False, runtime_env=local_runtime_env(ray_train, env_vars), **kwargs)


def init_ray(cfg: Any, ray_train: bool = False) -> bool:
    """Join a cluster (run.ray.address, or RAY_ADDRESS as `ray job submit` sets it) or start a new local Ray with
    the run.ray caps; `ray_train`: the job runs Ray Train (its workers get the quiet hook on a dashboard-less local
    Ray). True when this call started a local instance (its caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.run.ray.address or os.environ.get("RAY_ADDRESS", "")
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address:
        if os.environ.get(DASHBOARDLESS_ENV) == "1":  # joining the project's own local Ray (the demo's)
            kwargs["runtime_env"] = local_runtime_env(ray_train)
        ray.init(address=address, **kwargs)
        return False
    if cfg.run.ray.num_cpus:
        kwargs["num_cpus"] = cfg.run.ray.num_cpus
    if cfg.run.ray.object_store_memory_mb:
        kwargs["object_store_memory"] = cfg.run.ray.object_store_memory_mb * 2**20
    # "local" always starts a fresh instance with these caps; to join a running cluster from a plain run, set
    # run.ray.address (e.g. "auto") or RAY_ADDRESS. `ray job submit` sets RAY_ADDRESS by itself.
    start_local_ray(ray_train=ray_train, **kwargs)
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
