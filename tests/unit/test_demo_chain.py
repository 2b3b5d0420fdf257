"""The demo chain's stage window (demo/chain.py), without running any job: stages before --from reuse their
stored summaries, stages after --to do not run, and the teacher / student handed on come from the summaries."""

from __future__ import annotations

import json

import pytest

from demo.chain import STAGES, Chain, StageWindow, student_of, teacher_of


def stored(chain: Chain, stage: str, summary: dict) -> None:
    (chain.out / "summaries" / f"{stage}.json").write_text(json.dumps(
        {"stage": stage, "command": ["-m", stage], "seconds": 1.0, "returncode": 0, "summary": summary}))


def test_the_window_reuses_earlier_stages_runs_its_own_and_stops_after_to(tmp_path):
    chain = Chain(tmp_path, [], "", {})
    stored(chain, "pretrain", {"checkpoint_uri": "/ckpt/teacher", "export_uri": "/export/teacher"})
    stored(chain, "distill", {"registered_model": {"uri": "models:/vosr-student/3"}, "checkpoint_uri": "/s"})
    window = StageWindow(chain, "evaluate", "evaluate")
    ran: list[str] = []

    def run(stage):
        def go():
            ran.append(stage)
            chain.results[stage] = chain.load_previous("pretrain")  # stands for the job's own result
        return go

    teacher = teacher_of(window("pretrain", run("pretrain")))
    student = student_of(window("distill", run("distill")))
    assert (teacher, student) == ("/export/teacher", "models:/vosr-student/3")  # the export wins, the registry wins
    assert window("evaluate", run("evaluate")) is not None and window("serve", run("serve")) is None
    assert ran == ["evaluate"]  # neither the reused stages nor the one past --to ran
    assert [s for s in STAGES if s in chain.results] == ["pretrain", "distill", "evaluate"]


def test_a_missing_summary_or_model_is_a_clear_stop(tmp_path):
    chain = Chain(tmp_path, [], "", {})
    with pytest.raises(SystemExit, match="run the whole chain first"):
        StageWindow(chain, "distill", "serve")("pretrain", lambda: None)
    stored(chain, "distill", {"loss": 0.1})
    with pytest.raises(SystemExit, match="neither a registered model nor a checkpoint"):
        student_of(StageWindow(chain, "evaluate", "serve")("distill", lambda: None))
    stored(chain, "pretrain", {"checkpoint_uri": "/ckpt/teacher"})
    assert teacher_of(chain.load_previous("pretrain")) == "/ckpt/teacher" and teacher_of(None) == ""
