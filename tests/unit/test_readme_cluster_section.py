"""The README's "On a cluster" section without running it (it runs as written in tests/e2e/test_cluster_readme.py):
every job submitted once with its cluster config, and the rule it states for a submitted job's relative paths."""

from __future__ import annotations

import json

import pytest

from tests.helpers.readme import JOBS, job_of, readme_commands


def test_readme_section_submits_every_job_with_its_cluster_config():
    """Cheap shape check (no Ray): every job is submitted once, with its cluster config, to an explicit address,
    with the working dir, the tracking server and absolute/S3 paths for what it writes."""
    cmds = readme_commands()
    jobs = [j for j in map(job_of, cmds) if j]
    assert jobs == list(JOBS), jobs
    for cmd in cmds:
        if (job := job_of(cmd)) is None:
            continue
        flat = " ".join(cmd.replace("\\\n", " ").split())
        assert flat.startswith("ray job submit --address http://$HEAD:8265 --working-dir . -- python "), flat
        assert f"--config configs/cluster/{job}.yaml" in flat
        assert "--set run.mlflow.tracking_uri=$MLFLOW" in flat and "run.mlflow.artifact_location=$DATA/" in flat
    text = " ".join(cmds)
    for needed in ("source .venv/bin/activate", "export RAY_AUTH_MODE=token", "ray get-auth-token --generate",
                   "ray start --head", "ray start --address $HEAD:6379", "serve start --address $HEAD:6379",
                   "inference.serve:app", "curl "):
        assert needed in text, f"the README's cluster section lacks {needed!r}"
    assert "ray stop" not in text  # prose only: a test must never run it


def test_submitted_job_refuses_relative_output_paths(monkeypatch, capsys):
    """Unit check (no Ray) of the rule the README states: under `ray job submit` (Ray's job supervisor sets
    RAY_JOB_CONFIG_JSON_ENV_VAR), relative paths a job writes to are refused, naming the key; relative paths it
    only reads, and every path of a job run directly, are left alone."""
    from jobkit.args import SUBMITTED_JOB_ENV, parse_job_args, submitted_working_dir

    argv = ["--set", "curate.output=rel/curated", "--set", "curate.sources=[assets/urls.txt]",
            "--set", "run.mlflow.tracking_uri=http://127.0.0.1:5000"]
    monkeypatch.delenv(SUBMITTED_JOB_ENV, raising=False)
    assert submitted_working_dir() is None
    cfg, _ = parse_job_args("t", argv, writes=["curate.output"])  # run directly: unchanged behaviour
    assert cfg.curate.output == "rel/curated"

    monkeypatch.setenv(SUBMITTED_JOB_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"},
                                                     "metadata": {}}))
    assert submitted_working_dir() == "gcs://_ray_pkg_x.zip"
    with pytest.raises(SystemExit) as exc:
        parse_job_args("t", argv, writes=["curate.output"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "curate.output='rel/curated' is a relative path" in err and "ray job submit" in err
    assert "curate.sources" not in err  # read, not written: resolved in the submitted checkout
    # MLflow's files land under run.output_root unless both the server and the artifact location are given
    assert "run.output_root='outputs' is a relative path" in err

    ok = ["--set", "curate.output=s3://b/curated", "--set", "run.mlflow.tracking_uri=http://127.0.0.1:5000",
          "--set", "run.mlflow.artifact_location=/shared/mlartifacts"]
    cfg, _ = parse_job_args("t", ok, writes=["curate.output"])
    assert cfg.curate.output == "s3://b/curated"
    cfg, _ = parse_job_args("t", ["--set", "curate.output=/abs/curated", "--set", "run.output_root=/abs"],
                            writes=["curate.output"])
    assert cfg.run.output_root == "/abs"
