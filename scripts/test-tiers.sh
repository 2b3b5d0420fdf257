#!/usr/bin/env bash
# Run the named test tiers (tests/<tier>, described in tests/conftest.py), each in a pytest process of its own, in
# the order given: a tier's Ray heads, servers and in-process state (Ray switches a process that started a local
# Ray to token authentication for good) never reach the next tier, and one tier's failure does not stop the others.
# Exits non-zero when any tier failed. Extra pytest arguments: PYTEST_ARGS.
#   bash scripts/test-tiers.sh unit integration e2e
#   bash scripts/test-tiers.sh --args unit     # print the tier's own pytest arguments (benchmarks/suite_tiers.py)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"

# The tier's own pytest arguments, measured on the 2-core machine:
# - unit (no Ray, no servers: one pytest process keeps one of the two cores idle, 46% busy): pytest-xdist workers,
#   one per core up to 4: 149 s -> 82 s.
# - e2e (whole jobs: 68% busy in one process, waiting on process starts, fault detection and servers): two xdist
#   workers, each test file whole on one worker (--dist loadfile: module fixtures) in file order, so the README
#   chain, the longest, starts first: 784 s -> 590 s. Each worker's Rays keep to its own RAY_TMPDIR
#   (tests/conftest.py), so Ray's "latest cluster" lookups stay within the worker's clusters.
# - integration stays in one process: on two workers (255 s -> 195 s) the politeness test, which times requests
#   as the loopback server receives them, saw 10 starts in one second against a limit of 9 under the other
#   worker's load.
tier_args() {
    case "$1" in
        unit) echo "-n auto --maxprocesses 4" ;;
        e2e) echo "-n auto --maxprocesses 2 --dist loadfile --no-loadscope-reorder" ;;
        *) echo "" ;;
    esac
}
if [ "${1:-}" = "--args" ]; then
    tier_args "${2:?tier}"
    exit 0
fi
status=0
summary=()
for tier in "$@"; do
    echo "=== tests/$tier"
    start=$(date +%s)
    # shellcheck disable=SC2086,SC2046  # the tier's arguments and PYTEST_ARGS are split into arguments on purpose
    "$PY" -m pytest -q $(tier_args "$tier") ${PYTEST_ARGS:-} "tests/$tier"
    rc=$?
    summary+=("tests/$tier: exit $rc in $(( $(date +%s) - start )) s")
    [ "$rc" -eq 0 ] || status=1
done
printf '%s\n' "${summary[@]}"
exit "$status"
