"""Progress a person can follow: the progress line's format. The jobs' logs themselves (one line
per train.log_every steps, none of Ray Train's placement-group cleaner warnings on the demo's dashboard-less Ray)
are checked on the demo chain's stage logs: tests/test_demo_s3.py::check_progress_logs."""

from __future__ import annotations


def test_progress_line_format():
    from training.loop import progress_line

    line = progress_line("distill", 50, 400, 0.123456, 12.5, 3725.4, 40)
    assert line == ("[distill] step 50/400 (12.5%) | loss 0.1235 | 12.50 samples/s | ETA 1:02:05 | "
                    "last checkpoint: step 40")
    assert progress_line("pretrain", 1, 8, None, 1.0, None, None).endswith("ETA n/a | last checkpoint: none yet")
