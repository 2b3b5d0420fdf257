"""One-step distillation of the multi-step teacher on Ray Train (docs/method.md s7), registered in MLflow.

    python training/distill.py --config configs/distill/tiny.yaml --set distill_job.teacher=<checkpoint folder>

The student starts from the teacher's EMA weights plus a fresh target-time embedding; the teacher is frozen.
The loss is recursive consistency (distill.method=rcgm, default) or shortcut, with the teacher guidance omega
from distill.omega. At the end the student's final checkpoint is registered in the MLflow model registry under
distill_job.register_name as a pyfunc model that serves (training/registry.py), tagged with its preset, steps,
training run and data version, and distill_job.register_alias (champion) points at it; the summary JSON carries
the registered version.

Stages (training/job.py): resolve run -> skip if finished -> connect -> open data -> start tracking -> fit ->
summarise (prune checkpoints; an FSDP run exports its sharded final checkpoint) -> register -> finish.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from jobkit.args import job_main
from training.job import run_job


def _register(cfg):
    def after_fit(summary, result, paths, tracking_uri, run_id):
        name = cfg.distill_job.register_name
        if not name or not tracking_uri or result.checkpoint is None:
            return {"registered_model": None}
        from jobkit.tracking import resolve_registry_uri
        from training.registry import register_student, version_tags

        ckpt = result.checkpoint
        if summary.get("export_uri"):  # FSDP: the final checkpoint is sharded; register its unsharded export
            from training.resume import open_checkpoint

            ckpt = open_checkpoint(summary["export_uri"], paths.endpoint)
        with tempfile.TemporaryDirectory(prefix="vosr-student-") as tmp:
            folder = ckpt.to_directory(str(Path(tmp) / "checkpoint"))
            alias = cfg.distill_job.register_alias
            version = register_student(folder, name, tracking_uri, run_id, registry_uri=resolve_registry_uri(cfg),
                                       tags=version_tags(cfg, summary, run_id), alias=alias)
        return {"registered_model": {"name": name, "version": version, "uri": f"models:/{name}/{version}",
                                     "alias": alias or None}}
    return after_fit


def run(cfg) -> dict:
    return run_job(cfg, "distill", after_fit=_register(cfg))


def main(argv: list[str] | None = None) -> int:
    return job_main(__doc__, argv, lambda cfg, _: run(cfg), writes=["train.storage_path"])


if __name__ == "__main__":
    raise SystemExit(main())
