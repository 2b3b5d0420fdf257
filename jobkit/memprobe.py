"""Peak memory of one call, for the memory benchmarks (benchmarks/bench_memory.py): Linux /proc only, off unless
the environment names a log file.

`probe(kind)` wraps a task function: when VOSR_TASK_PEAK_LOG is set in the process that runs it (a Ray worker
gets it from the job's runtime_env), each call resets the process's peak-RSS mark (writing "5" to
/proc/self/clear_refs resets VmHWM to the current RSS, proc(5)), runs, and appends one JSON line to that file:
the kind, the RSS before, the peak during the call and the growth (peak - before), plus the rows of the
pyarrow tables it was given. Workers are reused across tasks, so "before" already holds what earlier calls left;
the growth is the call's own. Without the variable the wrapper costs one environment lookup.
"""

from __future__ import annotations

import functools
import json
import os
import time

ENV = "VOSR_TASK_PEAK_LOG"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes() -> int:
    """Resident set size now (bytes)."""
    return _status_kib("VmRSS") * 1024


def peak_bytes() -> int:
    """Peak resident set size since the process started or since the last reset_peak() (bytes)."""
    return _status_kib("VmHWM") * 1024


def reset_peak() -> bool:
    """Reset the peak mark to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rows(args) -> int:
    n = 0
    for a in args:
        rows = getattr(a, "num_rows", None)
        if isinstance(rows, int):
            n += rows
    return n


def probe(kind: str):
    """Decorator: log the peak memory of each call under `kind` when VOSR_TASK_PEAK_LOG is set (see above)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            log = os.environ.get(ENV)
            if not log:
                return fn(*args, **kwargs)
            reset_peak()
            before = rss_bytes()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            peak = peak_bytes()
            rec = {"kind": kind, "pid": os.getpid(), "rss_before": before, "peak": peak,
                   "growth": max(0, peak - before), "rows_in": _rows(args) + _rows(kwargs.values()),
                   "seconds": round(time.perf_counter() - t0, 4)}
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
            return out
        return inner
    return wrap
