#!/usr/bin/env bash
# Run the named test tiers (tests/<tier>, described in tests/conftest.py), each in a pytest process of its own, in
# the order given: a tier's Ray heads, servers and in-process state (Ray switches a process that started a local
# Ray to token authentication for good) never reach the next tier, and one tier's failure does not stop the others.
# Exits non-zero when any tier failed. Extra pytest arguments: PYTEST_ARGS.
#   bash scripts/test-tiers.sh unit integration e2e
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
status=0
summary=()
for tier in "$@"; do
    echo "=== tests/$tier"
    start=$(date +%s)
    # shellcheck disable=SC2086  # PYTEST_ARGS is split into arguments on purpose
    "$PY" -m pytest -q ${PYTEST_ARGS:-} "tests/$tier"
    rc=$?
    summary+=("tests/$tier: exit $rc in $(( $(date +%s) - start )) s")
    [ "$rc" -eq 0 ] || status=1
done
printf '%s\n' "${summary[@]}"
exit "$status"
