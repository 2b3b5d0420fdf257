"""What a job's runtime_env costs each Ray worker it starts (jobkit/ray_env.local_runtime_env).

    .venv/bin/python benchmarks/bench_worker_start.py [--actors 6] [--rounds 2]

One local Ray head (2 CPUs, no dashboard, as the project's local Rays) is joined in turn by jobs with three
runtime_envs: none (what a job that runs no Ray Train now gets), env_vars only, and the quiet hook of a training
job. Each job starts --actors actors one after the other (each a new worker process: an actor never reuses a
busy worker) and asks each for its pid and its process's CPU seconds (kept across Ray's exec from its set-up
interpreter into the worker). Prints, per runtime_env, seconds per actor start (wall, from the request to the
first answer) and CPU seconds per worker process, and the ratios against none. The rounds alternate the order,
so a machine that speeds up or slows down during the run weighs on every mode alike. CPU only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("none", "env_vars", "train hook")


def runtime_env(mode: str):
    from jobkit.ray_env import local_runtime_env

    if mode == "none":
        return local_runtime_env(False)
    if mode == "env_vars":
        return local_runtime_env(False, {"VOSR_BENCH": "1"})
    return local_runtime_env(True)


def one_job(address: str, mode: str, actors: int) -> tuple[float, float]:
    """(wall seconds per actor start, CPU seconds per worker process) of one job with `mode`'s runtime_env."""
    import ray

    ray.init(address=address, runtime_env=runtime_env(mode), log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Probe:
            def cpu(self) -> tuple[int, float]:
                t = os.times()
                return os.getpid(), t.user + t.system

        walls, cpus = [], []
        for _ in range(actors):
            t0 = time.perf_counter()
            a = Probe.remote()
            pid, cpu = ray.get(a.cpu.remote())
            walls.append(time.perf_counter() - t0)
            cpus.append(cpu)
            ray.kill(a)
        return statistics.median(walls), statistics.median(cpus)
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actors", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="vosr-b-", dir="/tmp"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 100 * 2**20, "include_dashboard": False,
        "env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                results[mode].append(one_job(cluster.address, mode, args.actors))
    finally:
        cluster.shutdown()
    base_wall = statistics.median(w for w, _ in results["none"])
    base_cpu = statistics.median(c for _, c in results["none"])
    print(f"{'runtime_env':<12} {'s per actor start':>18} {'CPU s per worker':>17} {'wall ratio':>11} {'CPU ratio':>10}")
    for mode in MODES:
        wall = statistics.median(w for w, _ in results[mode])
        cpu = statistics.median(c for _, c in results[mode])
        print(f"{mode:<12} {wall:>18.2f} {cpu:>17.2f} {wall / base_wall:>10.2f}x {cpu / base_cpu:>9.2f}x")
    print(f"({args.actors} actors per job, {args.rounds} rounds, medians; CPU includes Ray's set-up interpreter, "
          "which the worker replaces by exec)")


if __name__ == "__main__":
    main()
