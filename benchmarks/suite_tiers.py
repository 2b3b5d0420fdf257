"""The test suite's time per tier: pytest with --durations=0 on each tier folder (tests/unit, tests/integration,
tests/e2e; tests/conftest.py describes them), one pytest process per tier with the tier's own arguments (the unit
tier's xdist workers), as `make test-fast` (unit + integration) and `make test` (all three) run them.

    .venv/bin/python benchmarks/suite_tiers.py [--tiers unit integration e2e] [--root .] [--top 8] [--json out.json]
        [--pytest-args "-k 'not slowest'"]
    .venv/bin/python benchmarks/suite_tiers.py --root /path/to/older/checkout   # a checkout without tiers, see below

Prints, per tier: the tests run and their outcome, pytest's own wall seconds for the tier (collection included), the
sum of the tests' setup + call + teardown seconds, the share of the machine's cores busy meanwhile, and its slowest
tests; then the total and the load average before and after. The machine may be shared, or slower at one time than
another (the same tiers, same code, have taken 1.8x longer on this machine hours apart): a fixed reference workload
is timed before and after the suite (a pure-Python loop, small allocations and `import torch, ray` in fresh
interpreters, best of 3). Compare suite figures only between runs whose reference figures agree, or runs taken
back to back.

A checkout whose tests sit directly in tests/ (before the tiers) is run once, as `pytest tests`, and each test's
seconds are counted in the tier its file has in THIS checkout (a file since removed: --moved NAME=TIER, e.g.
test_demo_s3.py=e2e); its wall seconds are the whole run's. Run it under `flock /tmp/vosr-heavy.lock` on a shared
machine. The interpreter is --python (default: this one); the checkout's code is imported first (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("unit", "integration", "e2e")
DURATION = re.compile(r"^\s*([\d.]+)s (setup|call|teardown)\s+(\S+?\.py)::(.+?)\s*$")
SUMMARY = re.compile(r"^=*\s*(.*?) in ([\d.]+)s")
OUTCOME = re.compile(r"(\d+) (passed|failed|error|errors|skipped|deselected|xfailed|xpassed)")


def run_pytest(root: Path, python: str, paths: list[str], extra: list[str]) -> tuple[float, dict[str, float],
                                                                                  dict[str, int], str]:
    """(pytest's wall seconds, seconds per test id (setup + call + teardown), outcome counts, last lines)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0", "--durations-min=0", *extra,
           *paths]
    print(f"$ (cd {root} && {' '.join(cmd)})", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    per_test: dict[str, float] = defaultdict(float)
    wall, outcomes = elapsed, {}
    for line in proc.stdout.splitlines():
        if m := DURATION.match(line):
            per_test[f"{m.group(3)}::{m.group(4)}"] += float(m.group(1))
        elif (m := SUMMARY.match(line)) and OUTCOME.search(m.group(1)):
            wall = float(m.group(2))
            outcomes = {kind: int(n) for n, kind in OUTCOME.findall(m.group(1))}
    return wall, dict(per_test), outcomes, "\n".join(proc.stdout.splitlines()[-15:])


def tier_args(root: Path, tier: str) -> list[str]:
    """The tier's own pytest arguments as `make test` gives them (scripts/test-tiers.sh --args; e.g. the unit tier's
    xdist workers); none for a checkout whose script has no such arguments."""
    script = root / "scripts" / "test-tiers.sh"
    if not script.is_file() or "--args" not in script.read_text():
        return []
    out = subprocess.run(["bash", str(script), "--args", tier], capture_output=True, text=True, check=True).stdout
    return shlex.split(out)


REFERENCE_CODE = ("import time\nt = time.perf_counter()\ns = 0\nfor i in range(5_000_000):\n    s += i\n"
                  "u = time.perf_counter()\nx = [{'a': i, 'b': str(i)} for i in range(2_000_000)]\n"
                  "print(u - t, time.perf_counter() - u)")


def machine_reference(python: str) -> dict[str, float]:
    """Seconds of three fixed pieces of work in fresh interpreters, best of 3: a pure-Python loop of 5M additions,
    2M small dicts built (allocation), and `import torch, ray` (what every Ray worker and job process of the suite
    pays first)."""
    loop, alloc, imports = [], [], []
    for _ in range(3):
        out = subprocess.run([python, "-c", REFERENCE_CODE], capture_output=True, text=True, check=True).stdout
        loop.append(float(out.split()[0]))
        alloc.append(float(out.split()[1]))
        t0 = time.monotonic()
        subprocess.run([python, "-c", "import torch, ray"], capture_output=True, check=True)
        imports.append(time.monotonic() - t0)
    return {"python_loop_s": round(min(loop), 3), "python_alloc_s": round(min(alloc), 3),
            "import_torch_ray_s": round(min(imports), 3)}


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all cores since boot (/proc/stat; None where there is none): busy is all but
    idle and iowait."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)


def busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def tier_map(moved: dict[str, str]) -> dict[str, str]:
    """File name -> tier, from this checkout's folders (plus --moved for files since removed)."""
    found = {p.name: tier for tier in TIERS for p in (ROOT / "tests" / tier).glob("test_*.py")}
    return {**found, **moved}


def report(rows: dict[str, dict], top: int) -> None:
    print(f"\n{'tier':<12} {'tests':>6} {'outcome':<28} {'wall s':>8} {'sum of tests s':>15} {'cores busy':>11}")
    for tier, r in rows.items():
        outcome = ", ".join(f"{n} {k}" for k, n in sorted(r["outcomes"].items())) or "-"
        wall = f"{r['wall_s']:.1f}" if r["wall_s"] is not None else "(one run)"
        busy = f"{r['cores_busy']:.0%}" if r.get("cores_busy") is not None else "-"
        print(f"{tier:<12} {r['tests']:>6} {outcome:<28} {wall:>8} {r['sum_s']:>15.1f} {busy:>11}")
    print(f"{'total':<12} {sum(r['tests'] for r in rows.values()):>6} {'':<28} "
          f"{sum(r['wall_s'] or 0 for r in rows.values()):>8.1f} {sum(r['sum_s'] for r in rows.values()):>15.1f}")
    for tier, r in rows.items():
        print(f"\nslowest in {tier}:")
        for test, s in r["slowest"][:top]:
            print(f"  {s:8.1f} s  {test}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(ROOT), help="the checkout whose suite runs (default: this one)")
    p.add_argument("--tiers", nargs="+", default=list(TIERS), choices=TIERS)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--top", type=int, default=8, help="slowest tests listed per tier")
    p.add_argument("--moved", nargs="*", default=["test_demo_s3.py=e2e"], metavar="FILE=TIER",
                   help="tier of a file a flat (older) checkout has and this one no longer does")
    p.add_argument("--json", default="", help="also write the figures (per test seconds included) here")
    p.add_argument("--pytest-args", default="", help="more pytest arguments, one string (e.g. a --deselect)")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    extra = shlex.split(args.pytest_args)
    load_before = os.getloadavg()
    print(f"{os.cpu_count()} CPUs; load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    ref_before = machine_reference(args.python)
    print(f"machine reference before: {ref_before}", flush=True)
    rows: dict[str, dict] = {}
    if (root / "tests" / "unit").is_dir():
        for tier in args.tiers:
            cpu0 = cpu_times()
            wall, per_test, outcomes, tail = run_pytest(root, args.python, [f"tests/{tier}"],
                                                        [*tier_args(root, tier), *extra])
            print(tail, flush=True)
            rows[tier] = {"wall_s": wall, "tests": sum(v for k, v in outcomes.items() if k != "deselected"),
                          "outcomes": outcomes, "sum_s": sum(per_test.values()),
                          "cores_busy": busy_share(cpu0, cpu_times()),
                          "slowest": sorted(per_test.items(), key=lambda kv: -kv[1]), "per_test": per_test}
    else:
        tiers = tier_map(dict(m.split("=", 1) for m in args.moved))
        cpu0 = cpu_times()
        wall, per_test, outcomes, tail = run_pytest(root, args.python, ["tests"], extra)
        busy = busy_share(cpu0, cpu_times())
        print(tail, flush=True)
        print(f"one run of the whole flat suite: {wall:.1f} s wall, {outcomes}")
        split: dict[str, dict[str, float]] = {t: {} for t in (*args.tiers, "unplaced")}
        for test, s in per_test.items():
            tier = tiers.get(Path(test.split("::")[0]).name, "unplaced")
            split.setdefault(tier, {})[test] = s
        for tier, tests in split.items():
            if tier in args.tiers or tests:
                rows[tier] = {"wall_s": None, "tests": len(tests), "outcomes": {}, "sum_s": sum(tests.values()),
                              "slowest": sorted(tests.items(), key=lambda kv: -kv[1]), "per_test": tests}
        rows["(whole run)"] = {"wall_s": wall, "tests": 0, "outcomes": outcomes, "sum_s": 0.0, "cores_busy": busy,
                               "slowest": [], "per_test": {}}
    load_after = os.getloadavg()
    ref_after = machine_reference(args.python)
    report(rows, args.top)
    print(f"\nload average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"machine reference before: {ref_before}; after: {ref_after}")
    if args.json:
        Path(args.json).write_text(json.dumps({"root": str(root), "load_before": load_before,
                                               "load_after": load_after, "reference_before": ref_before,
                                               "reference_after": ref_after, "tiers": rows}, indent=1))
    return 0 if all(not r["outcomes"].get("failed") and not r["outcomes"].get("error") and
                    not r["outcomes"].get("errors") for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
