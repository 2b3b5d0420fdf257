"""The environment of the `mlflow server` processes the tests start.

MLflow 3's server also starts a job runner by default (MLFLOW_SERVER_ENABLE_JOB_EXECUTION, environment_variables.py
of mlflow): a `_job_runner` and about seven huey consumer processes, for its GenAI jobs, which the project never
submits. On the 2-core test machine they took ~10 s more to start and ~0.4 of a core while the server ran (measured
with `ps` beside a server with and without them); the tracking and artifact API the jobs use is the same without
them."""

MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
