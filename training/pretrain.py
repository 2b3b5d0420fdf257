"""Multi-step teacher pretraining on Ray Train (docs/method.md s5), tracked in MLflow, fault tolerant.

    python training/pretrain.py --config configs/train/tiny.yaml [--set train.steps=50 ...]
    ray job submit --working-dir . -- python training/pretrain.py --config configs/train/tiny.yaml

Stages (training/job.py): resolve run -> skip if finished -> connect -> open data -> start tracking -> fit ->
summarise (prune checkpoints; an FSDP run exports its sharded final checkpoint) -> finish. Prints the summary JSON and writes it to <train.storage_path>/<run.name>/summary.json.
"""

from __future__ import annotations

from jobkit.args import job_main
from training.job import run_job


def run(cfg) -> dict:
    return run_job(cfg, "pretrain")


def main(argv: list[str] | None = None) -> int:
    return job_main(__doc__, argv, lambda cfg, _: run(cfg), writes=["train.storage_path"])


if __name__ == "__main__":
    raise SystemExit(main())
