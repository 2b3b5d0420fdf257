"""MLflow from inside Ray Train workers: metrics and artifacts go to a run the driver created, by run id.

Workers run in other folders, so they receive the driver's resolved absolute tracking URI (jobkit/tracking.py)
and never rely on a relative `mlruns` folder. Only rank 0 logs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


class RunLogger:
    """Logs to one MLflow run through MlflowClient; a no-op when `run_id` is empty (tracking disabled)."""

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool = True):
        self.run_id = run_id
        self.enabled = bool(enabled and run_id and tracking_uri)
        self._client = None
        if self.enabled:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(key=k, value=float(v), timestamp=ts, step=int(step)) for k, v in values.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def params(self, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        from vosr.config import redact

        items = [Param(k, str(v)[:6000]) for k, v in redact(values).items()]
        self._client.log_batch(self.run_id, params=items)  # the client splits it into batches the server takes

    def tag(self, key: str, value: str) -> None:
        if self.enabled:
            from vosr.config import redact

            self._client.set_tag(self.run_id, key, redact(str(value), key))
