"""jobkit.tracking.log_job_run: the one MLflow run of a driver-side job (curate, precompute, evaluate, the demo's
serve record), on a real MLflow sqlite store with an absolute artifact root."""

from __future__ import annotations

import json
import os

from jobkit.config import load_config
from jobkit.tracking import log_job_run, resolve_tracking_uri


def test_a_job_run_is_named_tagged_and_holds_its_summary_metrics_and_files(tmp_path):
    cfg = load_config(None, [f"run.output_root={tmp_path}", "run.name=demo-serve"])
    note = tmp_path / "answer.txt"
    note.write_text("ok")
    summary = {"seconds": 2.5, "rows": 3, "nested": {"hits": 4}, "label": "text is not a metric"}
    run_id = log_job_run(cfg, "serve", {"command": "-m inference.serve --smoke"}, summary,
                         artifacts=[(note, None), (tmp_path / "missing.png", None)],
                         tags={"vosr.recorded_by": "demo.chain"})

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
    run = client.get_run(run_id)
    assert run.info.run_name == "demo-serve-serve" and run.info.status == "FINISHED"
    assert run.data.tags["vosr.job"] == "serve" and run.data.tags["vosr.recorded_by"] == "demo.chain"
    assert run.data.metrics == {"seconds": 2.5, "rows": 3.0, "nested.hits": 4.0}  # every number, nothing else
    assert run.data.params == {"command": "-m inference.serve --smoke"}
    files = {a.path for a in client.list_artifacts(run_id)}
    assert files == {"answer.txt", "serve_summary.json"}  # a missing file is skipped, not an error
    stored = json.loads(open(client.download_artifacts(run_id, "serve_summary.json", str(tmp_path))).read())
    assert stored == summary


def test_two_jobs_in_one_process_each_log_into_their_own_store(tmp_path, monkeypatch):
    # MLflow writes the URI it is pointed at into MLFLOW_TRACKING_URI; the jobs read that variable as the user's
    # setting, so without care the second job (a notebook, the Python API) would log into the first one's store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    from mlflow.tracking import MlflowClient

    ids = {}
    for name in ("first", "second"):
        cfg = load_config(None, [f"run.output_root={tmp_path / name}", f"run.name={name}"])
        ids[name] = (cfg, log_job_run(cfg, "serve", {}, {"seconds": 1.0}))
        assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    for name, (cfg, run_id) in ids.items():
        assert resolve_tracking_uri(cfg) == f"sqlite:///{(tmp_path / name).resolve() / 'mlflow.db'}"
        assert MlflowClient(tracking_uri=resolve_tracking_uri(cfg)).get_run(run_id).info.run_name == f"{name}-serve"
    # no registry of the last job is left process-wide: MLflow's registry follows its tracking URI again
    import mlflow

    assert mlflow.get_registry_uri() == mlflow.get_tracking_uri() == resolve_tracking_uri(ids["second"][0])
    # the user's own setting is kept, and used
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'user.db'}")
    cfg = load_config(None, [f"run.output_root={tmp_path / 'third'}", "run.name=third"])
    run_id = log_job_run(cfg, "serve", {}, {"seconds": 1.0})
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'user.db'}"
    assert MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'user.db'}").get_run(run_id).info.run_name == "third-serve"
