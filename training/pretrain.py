"""Multi-step teacher pretraining on Ray Train (docs/method.md s5), tracked in MLflow, fault tolerant.

    python training/pretrain.py --config configs/train/tiny.yaml [--set train.steps=50 ...]
    ray job submit --working-dir . -- python training/pretrain.py --config configs/train/tiny.yaml

Stages (training/job.py): resolve run -> skip if finished -> connect -> open data -> start tracking -> fit ->
summarise (prune checkpoints; an FSDP run exports its sharded final checkpoint) -> finish. Prints the summary JSON and writes it to <train.storage_path>/<run.name>/summary.json.
"""

from __future__ import annotations

import json

from jobkit.args import parse_job_args
from training.job import run_job
from vosr.config import redact


def run(cfg) -> dict:
    return run_job(cfg, "pretrain")


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_job_args(__doc__, argv,
                            writes=["train.storage_path"])
    summary = run(cfg)
    print(json.dumps(redact(summary), indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
