"""The one exception every job's fault-injection option raises (curate.fail_after_blocks / fail_after_shards,
precompute.fail_after_shards, train.fail_at_step): tests use it to kill a job part-way and check that a re-run
resumes from what was finished."""


class FaultInjected(RuntimeError):
    """Raised on purpose by a fault-injection option; never by a real failure."""
