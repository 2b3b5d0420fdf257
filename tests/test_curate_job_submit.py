"""`ray job submit` path of the curation job: a real local Ray with its dashboard (job server) started in this
process, the job submitted through JobSubmissionClient with the repository as runtime_env working_dir, exactly
as `ray job submit --working-dir . -- python pipelines/curate.py --config ...` sends it."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.curate_schema import CURATED_SCHEMA, shard_files
from tests.helpers.env import restored_environ

ROOT = Path(__file__).resolve().parents[1]
# what `ray job submit --working-dir .` would upload, minus heavy or generated folders
EXCLUDES = [".venv", ".git", "outputs", "mlruns", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"]
ENV_KEYS = ("PATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _submit(client, **kw) -> str:
    """submit_job, waiting for the head node's job agent, which comes up a moment after ray.init returns."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(**kw)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _free_agent_port(monkeypatch) -> int:
    """Give the head node's dashboard agent (the job server's worker side) a free port. Ray 2.60's ray.init has
    no argument for it and always uses 52365, which any other Ray instance on the machine (always on this
    shared one, never on a clean CI machine) already holds; the agent then runs without its HTTP service and
    every submission fails with "No available agent". RayParams is what ray.init builds the node from."""
    import ray._private.parameter as parameter

    from tests.helpers.http_fixture import free_port

    port = free_port()
    base = parameter.RayParams

    class RayParamsWithAgentPort(base):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("dashboard_agent_listen_port", port)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(parameter, "RayParams", RayParamsWithAgentPort)
    return port


def test_curate_under_ray_job_submit_with_working_dir(photos, tmp_path, monkeypatch):
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient

    src = tmp_path / "in"
    src.mkdir()
    for p in photos[:6]:
        shutil.copy(p, src / p.name)
    shutil.copy(photos[0], src / ("zz-copy-" + photos[0].name))  # an exact duplicate under another name
    out = tmp_path / "out"
    config = tmp_path / "curate-job.yaml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "run": {"name": "curate-job", "output_root": str(tmp_path / "root"), "seed": 5, "mlflow": {"enabled": False}},
        "curate": {"sources": [str(src)], "output": "placeholder", "rows_per_shard": 3,
                   "filters": {"min_short_side": 128, "min_sharpness": -100.0}, "balance": {"per_category_cap": 100, "num_clusters": 2}},
    }))

    if ray.is_initialized():
        ray.shutdown()
    agent_port = _free_agent_port(monkeypatch)
    with restored_environ(ENV_KEYS):  # PATH here; ray.init may set the RAY_AUTH_* ones
        # the job's `python` must be this interpreter (the job inherits the Ray node's PATH, as on a real cluster
        # whose nodes run inside the project's environment)
        os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
        try:
            ctx = ray.init(address="local", num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=True,
                           dashboard_host="127.0.0.1", log_to_driver=False)
            assert ctx.dashboard_url, "Ray started without its dashboard: no job server to submit to"
            assert ray._private.worker._global_node.dashboard_agent_listen_port == agent_port
            client = JobSubmissionClient(f"http://{ctx.dashboard_url}")
            gcs = ctx.address_info["gcs_address"]
            # Ray 2.60's job supervisor gives the driver RAY_ADDRESS resolved from "auto": with several Ray instances
            # on one machine (other tests here, never on a cluster node) that is the newest `ray start` /
            # cluster_utils instance, not necessarily this one. The explicit address keeps the job on this Ray.
            entry = (f"python pipelines/curate.py --config {config} --set curate.output={out} "
                     f"--set run.ray.address={gcs}")
            job = _submit(client, entrypoint=entry,
                          runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES,
                                       "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
            deadline = time.monotonic() + 240
            while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                 JobStatus.STOPPED):
                assert time.monotonic() < deadline, f"job still {status} after 240 s"
                time.sleep(0.5)
            logs = client.get_job_logs(job)
            assert status == JobStatus.SUCCEEDED, logs[-4000:]
            info = client.get_job_info(job)
        finally:
            ray.shutdown()

    # the job ran from the uploaded package, not from this checkout, and joined this Ray (not a new one)
    assert info.runtime_env["working_dir"].startswith("gcs://")
    assert "[curate] stage 1 block" in logs and "[curate] plan: 3 input blocks" in logs
    assert "Started a local Ray instance" not in logs and f"Connecting to existing Ray cluster at address: {gcs}" in logs
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(logs[logs.rindex("\n{") + 1:]) == summary  # the job printed its summary last
    assert (summary["seen"], summary["ok"], summary["duplicates"], summary["kept"]) == (7, 7, 1, 6)
    rows = [r for f in shard_files(str(out)) for r in pq.read_table(f).to_pylist()]
    assert len(shard_files(str(out))) == 3 and len(rows) == 7
    assert pq.read_schema(shard_files(str(out))[0]).equals(CURATED_SCHEMA, check_metadata=False)
    kept = sorted(Path(r["source"]).name.removeprefix("zz-copy-") for r in rows if r["kept"])
    assert kept == sorted(p.name for p in photos[:6])  # one of the two copies of photos[0] is kept
